"""Backend discovery and the built-in file backend."""

from __future__ import annotations

import types
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from pki import generate_key, issue, make_ca

from kmsproxy.certificates import CertificateError, CertificateSource
from kmsproxy.errors import UserError
from kmsproxy.plugins import file as file_backend
from kmsproxy.plugins.file import FileCertificateSource
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import (
    KNOWN_DISTRIBUTIONS,
    BrokenBackend,
    Registry,
    install_hint,
)
from kmsproxy.signer import Signer, SignerError, SoftwareSigner
from kmsproxy.uri import KeyURI, URIError


def fake_backend(name: str, scheme: str) -> types.ModuleType:
    """Build a third-party backend module the way a distribution ships one."""
    module = types.ModuleType(name)
    key = generate_key("p256")

    @hookimpl
    def kmsproxy_schemes() -> list[str]:
        return [scheme]

    @hookimpl
    def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
        if uri.scheme != scheme:
            return None
        return SoftwareSigner(key, uri.redacted())

    module.kmsproxy_schemes = kmsproxy_schemes  # type: ignore[attr-defined]
    module.kmsproxy_open_signer = kmsproxy_open_signer  # type: ignore[attr-defined]
    return module


def write_key(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_file_backend_from_entry_point() -> None:
    registry = Registry.load()
    backends = {backend.name: backend for backend in registry.backends}
    assert backends["file"].schemes == ("file",)
    assert backends["file"].distribution == "kmsproxy-core"


def test_path_goes_to_file_backend(tmp_path: Path) -> None:
    issued = issue(make_ca(), "client", client=True)
    key_path, _ = issued.write(tmp_path, "client")
    signer = Registry.load().open_signer(str(key_path))
    assert signer.public_key() == issued.key.public_key()
    assert signer.uri == str(key_path)


def test_file_uri_with_path(tmp_path: Path) -> None:
    issued = issue(make_ca(), "client", client=True)
    key_path, _ = issued.write(tmp_path, "client")
    signer = Registry.load().open_signer(f"file:path={key_path}")
    assert signer.public_key() == issued.key.public_key()


def test_file_uri_rejects_pin(tmp_path: Path) -> None:
    issued = issue(make_ca(), "client", client=True)
    key_path, _ = issued.write(tmp_path, "client")
    with pytest.raises(URIError) as caught:
        Registry.load().open_signer(f"file:path={key_path};pin=hunter2")
    message = str(caught.value)
    assert "unknown attribute pin " in message
    assert "file: URIs take password-file, path" in message
    assert "hunter2" not in message


def test_file_certificates_reject_unknown(tmp_path: Path) -> None:
    issued = issue(make_ca(), "client", client=True)
    _, certificate_path = issued.write(tmp_path, "client")
    with pytest.raises(URIError, match="unknown attribute format "):
        Registry.load().open_certificates(f"file:path={certificate_path};format=der")


def test_file_uri_without_path_name(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    with pytest.raises(URIError) as caught:
        Registry.load().open_signer(f"file:{path}")
    message = str(caught.value)
    assert message.startswith(f"file:{path}: missing path= before the path; ")
    assert f"write file:path={path} or the bare path {path}" in message


def test_file_uri_rfc8089_form(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    with pytest.raises(URIError) as caught:
        Registry.load().open_signer(f"file://{path}")
    message = str(caught.value)
    assert message.startswith(f"file://{path}: ")
    assert f"write file:path={path} or the bare path {path}" in message


def test_file_uri_without_path_name_quoted() -> None:
    with pytest.raises(URIError) as caught:
        Registry.load().open_signer("file:/keys/a.key;password-file=/run/pw")
    message = str(caught.value)
    assert "write 'file:path=/keys/a.key;password-file=/run/pw'" in message
    assert "bare path" not in message


def test_file_uri_without_path_name_secret() -> None:
    with pytest.raises(URIError) as caught:
        Registry.load().open_signer("file:/keys/a.key?pin-value=1234")
    message = str(caught.value)
    assert message.startswith("file:/keys/a.key?pin-value=***: ")
    assert "start it with file:path=/keys/a.key" in message
    assert "1234" not in message


def test_bare_part_before_path_stays_hidden() -> None:
    # With path= present, a bare first part is not a path and may be secret.
    with pytest.raises((URIError, UserError)) as caught:
        Registry.load().open_signer("file:s3cret;path=/keys/a.key")
    message = str(caught.value)
    assert "s3cret" not in message
    assert "missing path=" not in message


def core_only_registry() -> Registry:
    """Load a registry with only the file backend, whatever else is installed.

    The dev environment installs the four backends of this repository, so a
    test of the message for a missing one must not load entry points.
    """
    return Registry.load([file_backend], entry_points=False)


def test_missing_backend_names_folder() -> None:
    with pytest.raises(UserError) as caught:
        core_only_registry().open_signer("tpmkms:name=mykey")
    message = str(caught.value)
    assert message.startswith("tpmkms:name=mykey: ")
    assert "installed: file" in message
    assert "kmsproxy-tpm provides it" in message
    assert "`pip install ./packages/kmsproxy-tpm`" in message


@pytest.mark.parametrize("scheme", sorted(KNOWN_DISTRIBUTIONS))
def test_install_hint_never_bare_name(scheme: str) -> None:
    hint = install_hint(scheme)
    distribution = KNOWN_DISTRIBUTIONS[scheme]
    assert hint is not None
    assert f"pip install ./packages/{distribution}" in hint
    assert f"pip install {distribution}" not in hint


def test_known_distributions_in_repository() -> None:
    root = Path(__file__).resolve().parents[3]
    for distribution in KNOWN_DISTRIBUTIONS.values():
        pyproject = root / "packages" / distribution / "pyproject.toml"
        assert f'name = "{distribution}"' in pyproject.read_text()


def test_unknown_scheme_redacts_secret() -> None:
    with pytest.raises(UserError) as caught:
        core_only_registry().open_signer("yubikey:slot-id=9a?pin-value=123456")
    assert "123456" not in str(caught.value)
    assert "kmsproxy-yubikey provides it" in str(caught.value)


def test_misspelt_scheme_suggests_uninstalled() -> None:
    with pytest.raises(UserError) as caught:
        core_only_registry().open_signer("tpmks:name=k")
    message = str(caught.value)
    assert "did you mean tpmkms:?" in message
    assert "kmsproxy-tpm provides it" in message
    assert "`pip install ./packages/kmsproxy-tpm`" in message


def test_misspelt_scheme_suggests_installed() -> None:
    with pytest.raises(UserError) as caught:
        core_only_registry().open_signer("fiel:path=x.pem")
    message = str(caught.value)
    assert message.endswith("; did you mean file:?")


@pytest.mark.parametrize("scheme", ["softkms", "mackms", "cloudkms"])
def test_go_tool_scheme_not_supported(scheme: str) -> None:
    # Close to tpmkms as text, but another store: no "did you mean".
    with pytest.raises(UserError) as caught:
        core_only_registry().open_signer(f"{scheme}:name=k")
    message = str(caught.value)
    assert f"step-kms-plugin's {scheme}: is not supported" in message
    assert "did you mean" not in message


@pytest.mark.parametrize(
    ("typed", "scheme"),
    [
        ("tpmks", "tpmkms"),
        ("yubkey", "yubikey"),
        ("pkcs", "pkcs11"),
        ("awkms", "awskms"),
        ("fiel", "file"),
    ],
)
def test_misspelt_scheme_every_backend(typed: str, scheme: str) -> None:
    with pytest.raises(UserError) as caught:
        core_only_registry().open_signer(f"{typed}:name=k")
    assert f"did you mean {scheme}:?" in str(caught.value)


def test_misspelt_scheme_hides_secret() -> None:
    with pytest.raises(UserError) as caught:
        core_only_registry().open_signer("yubkey:slot-id=9a?pin-value=123456")
    assert "123456" not in str(caught.value)
    assert "did you mean yubikey:?" in str(caught.value)


def test_misspelt_scheme_names_broken_backend() -> None:
    broken = BrokenBackend("tpmkms", "kmsproxy-tpm", "OSError: libtss2-esys.so.0")
    registry = Registry(core_only_registry().plugin_manager, broken=[broken])
    with pytest.raises(UserError) as caught:
        registry.open_signer("tpmks:name=k")
    message = str(caught.value)
    assert "did you mean tpmkms:? Its backend 'tpmkms'" in message
    assert "failed to load: OSError: libtss2-esys.so.0" in message
    assert "pip install" not in message


def test_distant_scheme_points_to_backends() -> None:
    with pytest.raises(UserError) as caught:
        core_only_registry().open_signer("vault:name=x")
    message = str(caught.value)
    assert "did you mean" not in message
    assert "`kmsproxy backends`" in message


def test_unlisted_scheme_has_no_hint() -> None:
    with pytest.raises(UserError) as caught:
        Registry.load().open_signer("vault:name=x")
    assert "pip install" not in str(caught.value)


def test_missing_file_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        Registry.load().open_signer(str(tmp_path / "missing.key"))


def test_missing_file_hides_secret() -> None:
    """An argument that is neither a file nor a URI may still contain a PIN."""
    with pytest.raises(UserError, match="no such file") as caught:
        Registry.load().open_signer("token=x;pin-value=1234")
    assert "1234" not in str(caught.value)
    assert "token=x" in str(caught.value)


def test_third_party_backend_found() -> None:
    registry = Registry.load([fake_backend("kmsproxy_fake", "fakekms")])
    signer = registry.open_signer("fakekms:name=a")
    assert "fakekms" in registry.schemes
    assert signer.uri == "fakekms:name=a"


def test_third_party_without_certificates() -> None:
    registry = Registry.load([fake_backend("kmsproxy_fake", "fakekms")])
    with pytest.raises(UserError, match="does not provide certificates"):
        registry.open_certificates("fakekms:name=a")


def test_duplicate_scheme_names_both() -> None:
    first = fake_backend("kmsproxy_one", "fakekms")
    second = fake_backend("kmsproxy_two", "fakekms")
    with pytest.raises(UserError) as caught:
        Registry.load([first, second])
    assert "'fakekms'" in str(caught.value)
    assert "kmsproxy_one" in str(caught.value)
    assert "kmsproxy_two" in str(caught.value)


@pytest.mark.parametrize(
    ("encoding", "format_"),
    [
        (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
        (serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL),
        (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8),
        (serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL),
    ],
)
def test_key_formats(
    tmp_path: Path,
    encoding: serialization.Encoding,
    format_: serialization.PrivateFormat,
) -> None:
    key = generate_key("p256")
    data = key.private_bytes(encoding, format_, serialization.NoEncryption())
    path = write_key(tmp_path / "k", data)
    assert Registry.load().open_signer(str(path)).public_key() == key.public_key()


def encrypted_key(tmp_path: Path) -> tuple[Path, Signer]:
    key = generate_key("p256")
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret"),
    )
    return write_key(tmp_path / "enc.key", data), SoftwareSigner(key, "expected")


def test_encrypted_key_explains(tmp_path: Path) -> None:
    path, _ = encrypted_key(tmp_path)
    with pytest.raises(SignerError, match="encrypted; give its password"):
        Registry.load().open_signer(str(path))


def test_encrypted_key_password_file(tmp_path: Path) -> None:
    path, expected = encrypted_key(tmp_path)
    (tmp_path / "pw").write_text("s3cret\n")
    uri = f"file:path={path};password-file={tmp_path / 'pw'}"
    signer = Registry.load().open_signer(uri)
    assert signer.public_key() == expected.public_key()


def test_wrong_password_is_error(tmp_path: Path) -> None:
    path, _ = encrypted_key(tmp_path)
    (tmp_path / "pw").write_text("wrong\n")
    uri = f"file:path={path};password-file={tmp_path / 'pw'}"
    with pytest.raises(SignerError, match="wrong password"):
        Registry.load().open_signer(uri)


def test_garbage_key_names_file(tmp_path: Path) -> None:
    path = write_key(tmp_path / "garbage.key", b"not a key")
    with pytest.raises(SignerError, match=r"garbage\.key: not a PEM or DER"):
        Registry.load().open_signer(str(path))


def load_chain(source: CertificateSource) -> list[object]:
    async def main() -> list[object]:
        return list(await source.load())

    return anyio.run(main)


def test_pem_chain_leaf_first(tmp_path: Path) -> None:
    ca = make_ca()
    issued = issue(ca, "client", client=True)
    path = tmp_path / "chain.pem"
    path.write_bytes(issued.chain_pem() + ca.chain_pem())
    source = Registry.load().open_certificates(str(path))
    assert load_chain(source) == [issued.cert, ca.cert]
    assert list(source.watch_paths()) == [path]


def test_der_certificate(tmp_path: Path) -> None:
    issued = issue(make_ca(), "client", client=True)
    path = tmp_path / "client.der"
    path.write_bytes(issued.cert.public_bytes(serialization.Encoding.DER))
    assert load_chain(FileCertificateSource(path)) == [issued.cert]


def test_bad_certificate_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.crt"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match=r"bad\.crt"):
        load_chain(FileCertificateSource(path))


def test_encrypted_key_uri_quoted(tmp_path: Path) -> None:
    path, _ = encrypted_key(tmp_path)
    with pytest.raises(SignerError) as caught:
        Registry.load().open_signer(str(path))
    assert f"'file:path={path};password-file=FILE'" in str(caught.value)


def test_certificate_as_key_explained(tmp_path: Path) -> None:
    ca = make_ca()
    _, cert_path = ca.write(tmp_path, "ca")
    with pytest.raises(SignerError, match="contains a certificate where a private"):
        Registry.load().open_signer(str(cert_path))


def typo_backend(scheme: str) -> types.ModuleType:
    """Build a backend that rejects every URI as a parser does for a typo."""
    module = types.ModuleType(f"typo_{scheme}")

    @hookimpl
    def kmsproxy_schemes() -> list[str]:
        return [scheme]

    @hookimpl
    def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
        raise ValueError("unknown attribute 'regoin' (known: region)")

    module.kmsproxy_schemes = kmsproxy_schemes  # type: ignore[attr-defined]
    module.kmsproxy_open_signer = kmsproxy_open_signer  # type: ignore[attr-defined]
    return module


def test_open_value_error_is_user_error() -> None:
    registry = Registry.load([typo_backend("typo")], entry_points=False)
    with pytest.raises(UserError) as raised:
        registry.open_signer("typo:regoin=x;pin-value=1234")
    message = str(raised.value)
    assert message.startswith("typo:regoin=x;pin-value=***: ")
    assert "unknown attribute 'regoin'" in message
    assert "1234" not in message


def test_install_hint_names_pipx() -> None:
    hint = install_hint("tpmkms")
    assert hint is not None
    assert "`pipx inject kmsproxy-core ./packages/kmsproxy-tpm` (pipx)" in hint
    assert "`pip install ./packages/kmsproxy-tpm`" in hint


def test_yubikey_hint_orders_pkcs11_first() -> None:
    hint = install_hint("yubikey")
    assert hint is not None
    assert hint.endswith(
        ", after kmsproxy-pkcs11 in the same way (else pip fetches "
        "kmsproxy-pkcs11 from a package index)"
    )
