"""Startup errors about `--trust` bundles name the option and the file."""

from __future__ import annotations

from pathlib import Path

from test_cli import run_cli, write_site


def test_trust_missing_names_option(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    result = run_cli(*write_site(tmp_path), "--trust", str(missing))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"--trust/--cacert {missing}: cannot read trust bundle" in result.stderr


def test_trust_without_pem_names_option(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("not a certificate\n")
    result = run_cli(*write_site(tmp_path), "--trust", str(bundle))
    assert result.returncode == 2
    assert f"--trust/--cacert {bundle}: trust bundle contains no PEM" in result.stderr


def test_trust_invalid_pem_names_option(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(
        "-----BEGIN CERTIFICATE-----\nbm90IGRlcg==\n-----END CERTIFICATE-----\n"
    )
    result = run_cli(*write_site(tmp_path), "--cacert", str(bundle))
    assert result.returncode == 2
    assert f"--trust/--cacert {bundle}: invalid PEM trust bundle" in result.stderr
