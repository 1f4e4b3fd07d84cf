"""`kmsproxy init --key`: a CA certificate signed by a key in any backend.

These tests use file keys, which reach `init` through the same registry
call as a device key. The backend packages test their own keys.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pki import KeyType, generate_key, issue, make_ca
from test_cli import PROCESS_TIMEOUT_SECONDS, wait_for_line
from test_csr import write_key

from kmsproxy.ca import LeafRequest, LocalCA
from kmsproxy.cli import build_parser, main
from kmsproxy.cli.init import create_ca, serve_command, sign_ca_certificate
from kmsproxy.cli.serve import config_from_args
from kmsproxy.config import ProxyConfig
from kmsproxy.errors import UserError
from kmsproxy.plugins.file import load_private_key
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import SignatureScheme, Signer, SignerError, SoftwareSigner
from kmsproxy.uri import KeyURI


def read_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize("key_type", ["p256", "p384", "rsa2048"])
def test_init_key_writes_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key_type: KeyType
) -> None:
    key = generate_key(key_type)
    key_path = write_key(tmp_path / "device.key", key)
    directory = tmp_path / "ca"
    status = main(["init", "--key", str(key_path), "--dir", str(directory)])
    assert status == 0
    certificate = read_certificate(directory / "ca.crt")
    certificate.verify_directly_issued_by(certificate)
    assert certificate.public_key() == key.public_key()
    assert not (directory / "ca.key").exists()
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    output = capsys.readouterr().out
    assert f"kmsproxy serve {key_path} {directory / 'ca.crt'}" in output
    assert "update-ca-certificates" in output


def test_init_key_sets_name(tmp_path: Path) -> None:
    key_path = write_key(tmp_path / "device.key", generate_key("p256"))
    arguments = ["init", "--key", str(key_path), "--dir", str(tmp_path / "ca")]
    assert main([*arguments, "--name", "team CA"]) == 0
    certificate = read_certificate(tmp_path / "ca" / "ca.crt")
    assert certificate.subject.rfc4514_string() == "CN=team CA"


def test_init_key_certificate_mints_leaves(tmp_path: Path) -> None:
    key = generate_key("p256")
    key_path = write_key(tmp_path / "device.key", key)
    assert main(["init", "--key", str(key_path), "--dir", str(tmp_path)]) == 0
    certificate = read_certificate(tmp_path / "ca.crt")
    ca = LocalCA(certificate, SoftwareSigner(key, str(key_path)))
    leaf_key = ec.generate_private_key(ec.SECP256R1())

    async def mint() -> x509.Certificate:
        request = LeafRequest("example.test", dns_names=("example.test",))
        return await ca.mint_leaf(request, leaf_key.public_key())

    leaf = anyio.run(mint)
    leaf.verify_directly_issued_by(certificate)


def test_init_key_keeps_existing_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, certificate_path = create_ca(tmp_path, "old CA")
    before = certificate_path.read_bytes()
    key_path = write_key(tmp_path / "device.key", generate_key("p256"))
    status = main(["init", "--key", str(key_path), "--dir", str(tmp_path)])
    assert status == 2
    assert "ca.key already exists; pass --force" in capsys.readouterr().err
    assert certificate_path.read_bytes() == before


def test_init_key_force_replaces_ca(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_key_path, certificate_path = create_ca(tmp_path, "old CA")
    key = generate_key("p256")
    key_path = write_key(tmp_path / "device.key", key)
    arguments = ["init", "--key", str(key_path), "--dir", str(tmp_path), "--force"]
    with caplog.at_level(logging.WARNING, logger="kmsproxy.cli.init"):
        assert main(arguments) == 0
    assert read_certificate(certificate_path).public_key() == key.public_key()
    # The old key would not match the new certificate, so it is gone.
    assert not old_key_path.exists()
    messages = [record.getMessage() for record in caplog.records]
    assert f"Deleted the previous CA key path={old_key_path}" in messages


@pytest.mark.parametrize("form", ["path", "file-uri"])
def test_init_key_resigns_own_ca_key(tmp_path: Path, form: str) -> None:
    """`--key` naming the directory's own ca.key re-signs ca.crt with --force
    and keeps the key."""
    key_path, certificate_path = create_ca(tmp_path, "old CA")
    key_bytes = key_path.read_bytes()
    old_certificate = read_certificate(certificate_path)
    key = str(key_path) if form == "path" else f"file:path={key_path}"
    arguments = ["init", "--key", key, "--dir", str(tmp_path), "--name", "renewed"]
    assert main([*arguments, "--force"]) == 0
    new_certificate = read_certificate(certificate_path)
    assert key_path.read_bytes() == key_bytes
    assert new_certificate.public_key() == old_certificate.public_key()
    assert new_certificate.subject.rfc4514_string() == "CN=renewed"


def test_init_key_own_ca_key_keeps_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing ca.crt still needs --force when --key is the own ca.key."""
    key_path, certificate_path = create_ca(tmp_path, "old CA")
    before = certificate_path.read_bytes()
    status = main(["init", "--key", str(key_path), "--dir", str(tmp_path)])
    assert status == 2
    assert "ca.crt already exists; pass --force" in capsys.readouterr().err
    assert certificate_path.read_bytes() == before


def test_init_key_own_ca_key_needs_no_force(tmp_path: Path) -> None:
    """Without ca.crt, the own ca.key alone does not need --force."""
    key_path, certificate_path = create_ca(tmp_path, "old CA")
    certificate_path.unlink()
    assert main(["init", "--key", str(key_path), "--dir", str(tmp_path)]) == 0
    assert key_path.exists()
    assert certificate_path.exists()


def test_init_key_unknown_scheme(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["init", "--key", "nosuch:name=ca", "--dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert status == 2
    assert "no installed backend handles the scheme 'nosuch'" in error
    assert not (tmp_path / "ca.crt").exists()


def test_serve_command_quotes_uri() -> None:
    line = serve_command("tpmkms:name=ca;tcti=tabrmd", Path("/home/me/ca.crt"))
    expected = "kmsproxy serve 'tpmkms:name=ca;tcti=tabrmd' /home/me/ca.crt"
    assert line.startswith(expected)


def test_serve_command_redacts_pin() -> None:
    line = serve_command("yubikey:slot-id=9c?pin-value=123456", Path("ca.crt"))
    assert "123456" not in line
    assert "pin-value=***" in line


# Scheme of `PinKeyBackend`, a software key that takes a PIN as a device does.
PIN_SCHEME = "pinkey"


class PinKeyBackend:
    """A backend that opens the key file in `path=` and ignores its PIN.

    The file backend rejects `pin-value=` and `pin-source=`, so the tests of
    how `init --key` handles a PIN open their key through this one.
    """

    @hookimpl
    def kmsproxy_schemes(self) -> list[str]:
        return [PIN_SCHEME]

    @hookimpl
    def kmsproxy_open_signer(self, uri: KeyURI) -> Signer | None:
        if uri.scheme != PIN_SCHEME:
            return None
        key = load_private_key(Path(uri.get("path") or ""))
        return SoftwareSigner(key, uri.redacted())


@pytest.fixture
def pin_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Add `PinKeyBackend` to every registry that the CLI loads."""
    load = Registry.load.__func__  # type: ignore[attr-defined]

    def load_with_pin_backend(
        cls: type[Registry], /, plugins: Iterable[object] = (), **options: bool
    ) -> Registry:
        return load(cls, [PinKeyBackend(), *plugins], **options)  # type: ignore[no-any-return]

    monkeypatch.setattr(Registry, "load", classmethod(load_with_pin_backend))


@pytest.mark.usefixtures("pin_backend")
def test_init_key_output_redacts_pin(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_path = write_key(tmp_path / "device.key", generate_key("p256"))
    key = f"{PIN_SCHEME}:path={key_path};pin-value=secret-4711"
    assert main(["init", "--key", key, "--dir", str(tmp_path / "ca")]) == 0
    output = capsys.readouterr().out
    assert "secret-4711" not in output
    assert "give it with pin-source=FILE" in output


class WrongSigner(SoftwareSigner):
    """Signs with a different key than the public key it reports."""

    def __init__(self) -> None:
        super().__init__(generate_key("p256"), "wrong:name=ca")
        self._other = SoftwareSigner(generate_key("p256"), "other")

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        return await self._other.sign(data, scheme)


def test_wrong_signature_is_error() -> None:
    with pytest.raises(SignerError, match="does not verify"):
        anyio.run(sign_ca_certificate, WrongSigner(), "CA")


@pytest.mark.parametrize(("name", "length"), [("", 0), ("x" * 65, 65)])
def test_init_name_length_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, length: int
) -> None:
    assert main(["init", "--dir", str(tmp_path), "--name", name]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"kmsproxy: error: --name has {length} characters: a certificate's "
        "common name takes 1 to 64 (RFC 5280 ub-common-name); choose a "
        "shorter or non-empty name\n"
    )
    assert not (tmp_path / "ca.key").exists()


def test_init_directories_private_under_umask_000(tmp_path: Path) -> None:
    directory = tmp_path / "xdg" / "kmsproxy"
    previous = os.umask(0)
    try:
        assert main(["init", "--dir", str(directory)]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "xdg").stat().st_mode) == 0o700
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def serve_config(*args: str) -> ProxyConfig:
    return config_from_args(build_parser(None).parse_args(["serve", *args]))


CLIENT_ARGUMENTS = ("--clientkey", "client.key", "--clientcert", "client.crt")


def test_init_key_records_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = write_key(tmp_path / "device.key", generate_key("p256"))
    directory = tmp_path / "ca"
    assert main(["init", "--key", str(key_path), "--dir", str(directory)]) == 0
    assert (directory / "ca.key-uri").read_text() == f"{key_path}\n"
    assert f"Recorded the CA key in {directory / 'ca.key-uri'}" in (
        capsys.readouterr().out
    )


@pytest.mark.usefixtures("pin_backend")
def test_init_key_records_uri_with_pin_source(tmp_path: Path) -> None:
    key_path = write_key(tmp_path / "device.key", generate_key("p256"))
    key = f"{PIN_SCHEME}:path={key_path}?pin-source={tmp_path / 'pin'}"
    assert main(["init", "--key", key, "--dir", str(tmp_path / "ca")]) == 0
    assert (tmp_path / "ca" / "ca.key-uri").read_text() == f"{key}\n"


@pytest.mark.usefixtures("pin_backend")
def test_init_key_pin_value_not_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = write_key(tmp_path / "device.key", generate_key("p256"))
    key = f"{PIN_SCHEME}:path={key_path};pin-value=secret-4711"
    assert main(["init", "--key", key, "--dir", str(tmp_path / "ca")]) == 0
    assert not (tmp_path / "ca" / "ca.key-uri").exists()
    assert "not recorded in ca.key-uri" in capsys.readouterr().out


@pytest.fixture
def recorded_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run `init --key` with a file key in the config directory under
    `tmp_path`; return the key's path."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    key_path = write_key(tmp_path / "device.key", generate_key("p256"))
    assert main(["init", "--key", str(key_path)]) == 0
    return key_path


def test_serve_uses_recorded_key(tmp_path: Path, recorded_key: Path) -> None:
    config = serve_config(*CLIENT_ARGUMENTS)
    assert config.ca_key == str(recorded_key)
    assert config.ca_certificate == tmp_path / "kmsproxy" / "ca.crt"


@pytest.mark.usefixtures("recorded_key")
def test_serve_names_missing_ca_key(tmp_path: Path) -> None:
    """ca.crt from `init --key` without ca.key-uri: the error names where the
    key is and how to pass it."""
    (tmp_path / "kmsproxy" / "ca.key-uri").unlink()
    with pytest.raises(UserError) as raised:
        serve_config(*CLIENT_ARGUMENTS)
    message = str(raised.value)
    certificate_path = tmp_path / "kmsproxy" / "ca.crt"
    assert f"{certificate_path} has no ca.key beside it" in message
    assert f"`kmsproxy serve 'URI' {certificate_path} --clientkey" in message
    assert "run `kmsproxy init` first" not in message


def test_serve_names_missing_ca_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    key_path, certificate_path = create_ca(tmp_path / "kmsproxy", "CA")
    certificate_path.unlink()
    with pytest.raises(UserError, match=re.escape(f"{key_path} has no ca.crt")):
        serve_config(*CLIENT_ARGUMENTS)


def test_serve_rejects_two_ca_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    create_ca(tmp_path / "kmsproxy", "CA")
    (tmp_path / "kmsproxy" / "ca.key-uri").write_text("tpmkms:name=ca\n")
    with pytest.raises(UserError, match=re.escape("has both ca.key and ca.key-uri")):
        serve_config(*CLIENT_ARGUMENTS)


@pytest.mark.usefixtures("recorded_key")
def test_serve_rejects_empty_key_uri_file(tmp_path: Path) -> None:
    (tmp_path / "kmsproxy" / "ca.key-uri").write_text("\n")
    with pytest.raises(UserError, match="must contain one line"):
        serve_config(*CLIENT_ARGUMENTS)


def test_init_force_drops_key_uri(tmp_path: Path) -> None:
    """A new ca.key replaces the recorded key of an earlier `init --key`."""
    key_path = write_key(tmp_path / "device.key", generate_key("p256"))
    assert main(["init", "--key", str(key_path), "--dir", str(tmp_path)]) == 0
    assert main(["init", "--dir", str(tmp_path)]) == 2
    assert main(["init", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.key").exists()
    assert not (tmp_path / "ca.key-uri").exists()


def test_serve_cli_starts_with_recorded_key(tmp_path: Path, recorded_key: Path) -> None:
    """The real `serve` opens the recorded CA key, which must match ca.crt,
    before it listens."""
    issue(make_ca(), "client", client=True).write(tmp_path, "client")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "kmsproxy", "serve",
            "--clientkey", str(tmp_path / "client.key"),
            "--clientcert", str(tmp_path / "client.crt"),
            "--listen", "127.0.0.1:0", "--pac-listen", "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for_line(process, r"Proxy listening addresses=127\.0\.0\.1:\d+")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=PROCESS_TIMEOUT_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
