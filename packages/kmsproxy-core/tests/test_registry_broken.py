"""Backends that fail to load: listed as broken, and the others keep working.

Each test installs fake distributions at test time: a `*.dist-info`
directory with an `entry_points.txt`, in a temporary directory put first on
`sys.path` (in-process) or on `PYTHONPATH` (for the CLI).
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import make_ca

from kmsproxy.errors import UserError
from kmsproxy.plugins import registry as registry_module
from kmsproxy.plugins.registry import Registry

# Upper bound for one kmsproxy process; it takes well under a second.
PROCESS_TIMEOUT_SECONDS = 30.0

WORKING_MODULE = "kmsproxy_fake_working"

# Entry point names of the fake backends that fail to load.
BROKEN_NAMES = ("clibkms", "missingkms", "raisingkms")

# A backend module that loads and opens `okkms:` keys with a fresh P-256 key.
WORKING_SOURCE = """
from cryptography.hazmat.primitives.asymmetric import ec

from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.signer import SoftwareSigner


@hookimpl
def kmsproxy_schemes():
    return ["okkms"]


@hookimpl
def kmsproxy_open_signer(uri):
    key = ec.generate_private_key(ec.SECP256R1())
    return SoftwareSigner(key, uri.redacted())
"""

# A backend whose kmsproxy_schemes hook raises, as one with a missing
# device library might when it probes the library.
RAISING_SOURCE = """
from kmsproxy.plugins.hookspecs import hookimpl


@hookimpl
def kmsproxy_schemes():
    raise RuntimeError("libfake.so.1: cannot open shared object file")
"""


COMMANDS_MODULE = "kmsproxy_fake_commands"

# A backend that loads, but whose kmsproxy_add_commands hook raises.
COMMANDS_SOURCE = """
from kmsproxy.plugins.hookspecs import hookimpl


@hookimpl
def kmsproxy_schemes():
    return ["commandskms"]


@hookimpl
def kmsproxy_add_commands(subparsers):
    raise RuntimeError("cannot add commands")
"""


def write_distribution(
    site: Path, distribution: str, entry_point: str, target: str
) -> None:
    """Write a minimal installed distribution with one `kmsproxy` entry point."""
    info = site / f"{distribution.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(f"[kmsproxy]\n{entry_point} = {target}\n")


def make_site(site: Path) -> Path:
    """Install five fake backends into `site`.

    One works, three fail to load, and one loads but fails to add commands.
    """
    site.mkdir()
    (site / f"{WORKING_MODULE}.py").write_text(WORKING_SOURCE)
    write_distribution(site, "kmsproxy-fake-working", "okkms", WORKING_MODULE)

    # The module does not exist: ModuleNotFoundError.
    write_distribution(
        site, "kmsproxy-fake-missing", "missingkms", "kmsproxy_fake_absent.plugin"
    )

    # An extension module that the dynamic loader rejects, as it does when a
    # shared library is missing or damaged: a real ImportError from dlopen.
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (site / f"kmsproxy_fake_clib{suffix}").write_bytes(b"not an ELF file\n")
    write_distribution(site, "kmsproxy-fake-clib", "clibkms", "kmsproxy_fake_clib")

    (site / "kmsproxy_fake_raising.py").write_text(RAISING_SOURCE)
    (site / f"{COMMANDS_MODULE}.py").write_text(COMMANDS_SOURCE)
    write_distribution(site, "kmsproxy-fake-commands", "commandskms", COMMANDS_MODULE)
    write_distribution(
        site, "kmsproxy-fake-raising", "raisingkms", "kmsproxy_fake_raising"
    )
    return site


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = make_site(tmp_path / "site-packages")
    monkeypatch.syspath_prepend(str(directory))
    yield directory
    for name in (WORKING_MODULE, COMMANDS_MODULE, "kmsproxy_fake_raising"):
        sys.modules.pop(name, None)


def run_cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "kmsproxy", *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        env={**os.environ, "PYTHONPATH": path},
        check=False,
    )


def test_broken_backends_collected(site: Path) -> None:
    registry = Registry.load()
    # The dev environment's own backends may be broken too while in progress.
    broken = {b.name: b for b in registry.broken if b.name in BROKEN_NAMES}
    assert sorted(broken) == sorted(BROKEN_NAMES)
    assert broken["missingkms"].distribution == "kmsproxy-fake-missing"
    assert broken["missingkms"].error.startswith("ModuleNotFoundError: ")
    assert "kmsproxy_fake_absent" in broken["missingkms"].error
    assert broken["clibkms"].error.startswith("ImportError: ")
    assert broken["raisingkms"].error == (
        "RuntimeError: libfake.so.1: cannot open shared object file"
    )


def test_working_backend_still_loads(site: Path) -> None:
    registry = Registry.load()
    assert "okkms" in registry.schemes
    assert "file" in registry.schemes
    assert "raisingkms" not in registry.schemes
    assert registry.open_signer("okkms:name=a").uri == "okkms:name=a"


def test_broken_scheme_names_backend(site: Path) -> None:
    with pytest.raises(UserError) as caught:
        Registry.load().open_signer("missingkms:name=a")
    message = str(caught.value)
    assert message.startswith(
        "missingkms:name=a: backend 'missingkms' (kmsproxy-fake-missing) failed "
        "to load: ModuleNotFoundError: "
    )
    assert "\n" not in message
    assert "`kmsproxy backends`" in message


def test_unknown_scheme_lists_broken(site: Path) -> None:
    with pytest.raises(UserError) as caught:
        Registry.load().open_signer("vault:name=a")
    message = str(caught.value)
    assert "no installed backend handles the scheme 'vault'" in message
    listed = message.partition("; failed to load: ")[2]
    for name in BROKEN_NAMES:
        assert f"'{name}'" in listed


def test_broken_logged_once(
    site: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "_logged_broken", set())
    Registry.load()
    Registry.load()
    messages = [
        r.getMessage() for r in caplog.records if "backend=clibkms" in r.getMessage()
    ]
    assert len(messages) == 1
    assert messages[0].startswith("Backend failed to load backend=clibkms ")


def test_cli_backends_lists_broken(site: Path) -> None:
    result = run_cli(site, "backends")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "okkms:\tinstalled\tkmsproxy-fake-working" in lines
    assert "file:\tinstalled\tkmsproxy-core" in lines
    missing = [line for line in lines if line.startswith("missingkms:")]
    assert len(missing) == 1
    assert missing[0].startswith(
        "missingkms:\tbroken\tbackend 'missingkms' (kmsproxy-fake-missing) "
        "failed to load: ModuleNotFoundError: "
    )
    assert any(line.startswith("clibkms:\tbroken\t") for line in lines)
    assert "Backend failed to load backend=missingkms" in result.stderr


def test_cli_serve_broken_one_line(site: Path, tmp_path: Path) -> None:
    key, certificate = make_ca().write(tmp_path, "ca")
    result = run_cli(
        site, "serve", str(key), str(certificate),
        "--clientkey", "clibkms:name=k", "--clientcert", str(certificate),
    )  # fmt: skip
    assert result.returncode == 2
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("kmsproxy:")
    ]
    assert len(errors) == 1
    assert errors[0].startswith(
        "kmsproxy: error: clibkms:name=k: backend 'clibkms' (kmsproxy-fake-clib) "
        "failed to load: ImportError: "
    )
    assert "Traceback" not in result.stderr


def test_cli_works_beside_broken(site: Path, tmp_path: Path) -> None:
    key, _ = make_ca().write(tmp_path, "ca")
    result = run_cli(site, "csr", str(key), "--subject", "CN=me")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----")


def test_cli_survives_failing_commands(site: Path) -> None:
    result = run_cli(site, "backends")
    assert result.returncode == 0, result.stderr
    assert "commandskms:\tinstalled\tkmsproxy-fake-commands" in result.stdout
    assert (
        "Backend commands not added backend=commandskms "
        "error=RuntimeError: cannot add commands"
    ) in result.stderr
