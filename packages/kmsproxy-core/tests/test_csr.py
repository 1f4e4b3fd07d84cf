"""`kmsproxy csr`: requests that cryptography, OpenSSL and the proxy accept."""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pki import KeyType, generate_key, make_ca

from kmsproxy import Proxy, ProxyConfig
from kmsproxy.cli.csr import create_request, parse_san, parse_subject
from kmsproxy.cli.demo import (
    create_demo_files,
    fetch_through_proxy,
    serve_mtls_upstream,
    upstream_context,
)
from kmsproxy.errors import UserError
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import (
    PrivateKey,
    SignatureScheme,
    Signer,
    SignerError,
    SoftwareSigner,
)
from kmsproxy.uri import KeyURI

# Upper bound for one kmsproxy or openssl process; each takes well under a
# second on an idle machine.
PROCESS_TIMEOUT_SECONDS = 30.0

# Upper bound for the round trip through the proxy; loopback takes
# milliseconds.
ROUND_TRIP_TIMEOUT_SECONDS = 30.0

LIMITED_SCHEME = "limited"


class LimitedSigner(SoftwareSigner):
    """An RSA key whose store offers only some schemes, like many tokens."""

    def __init__(
        self, key: PrivateKey, uri: str, schemes: Sequence[SignatureScheme]
    ) -> None:
        super().__init__(key, uri)
        self._limited = list(schemes)

    @property
    def schemes(self) -> Sequence[SignatureScheme]:
        return self._limited


class LimitedBackend:
    """A backend plugin that opens `limited:name=...` as a `LimitedSigner`."""

    def __init__(self, schemes: Sequence[SignatureScheme]) -> None:
        self.key = generate_key("rsa2048")
        self.schemes = schemes

    @hookimpl
    def kmsproxy_schemes(self) -> list[str]:
        return [LIMITED_SCHEME]

    @hookimpl
    def kmsproxy_open_signer(self, uri: KeyURI) -> Signer | None:
        if uri.scheme != LIMITED_SCHEME:
            return None
        return LimitedSigner(self.key, uri.redacted(), self.schemes)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsproxy", *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        check=False,
    )


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found on PATH (install the Debian package openssl)")
    return subprocess.run(
        ["openssl", *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        check=False,
    )


def write_key(path: Path, key: PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def request_for(
    registry: Registry, key: str, names: Sequence[str] = ("client.example",)
) -> x509.CertificateSigningRequest:
    subject = parse_subject("CN=me,O=Example")
    sans = [parse_san(name) for name in names]
    return anyio.run(create_request, registry, key, subject, sans)


@pytest.mark.parametrize("key_type", ["p256", "p384", "rsa2048", "ed25519"])
def test_csr_per_key_type(tmp_path: Path, key_type: KeyType) -> None:
    key = generate_key(key_type)
    key_path = write_key(tmp_path / "client.key", key)
    result = run_cli("csr", str(key_path), "--subject", "CN=me,O=Example")
    assert result.returncode == 0, result.stderr
    request = x509.load_pem_x509_csr(result.stdout.encode())
    assert request.is_signature_valid
    assert public_der(request.public_key()) == public_der(key.public_key())
    (tmp_path / "req.csr").write_text(result.stdout)
    verified = openssl("req", "-verify", "-noout", "-in", str(tmp_path / "req.csr"))
    assert verified.returncode == 0, verified.stderr


def test_csr_rsa_uses_pkcs1(tmp_path: Path) -> None:
    key_path = write_key(tmp_path / "client.key", generate_key("rsa2048"))
    request = request_for(Registry.load(), str(key_path))
    assert isinstance(request.signature_algorithm_parameters, padding.PKCS1v15)


def test_csr_rsa_pss_only_signer(tmp_path: Path) -> None:
    backend = LimitedBackend([SignatureScheme.rsa_pss_rsae_sha256])
    request = request_for(Registry.load([backend]), f"{LIMITED_SCHEME}:name=k")
    assert request.is_signature_valid
    assert isinstance(request.signature_algorithm_parameters, padding.PSS)
    assert public_der(request.public_key()) == public_der(backend.key.public_key())
    path = tmp_path / "req.csr"
    path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    verified = openssl("req", "-verify", "-noout", "-in", str(path))
    assert verified.returncode == 0, verified.stderr


def test_csr_rsa_sha384_only_signer() -> None:
    backend = LimitedBackend([SignatureScheme.rsa_pkcs1_sha384])
    request = request_for(Registry.load([backend]), f"{LIMITED_SCHEME}:name=k")
    assert request.is_signature_valid
    assert isinstance(request.signature_hash_algorithm, hashes.SHA384)


def test_csr_no_usable_scheme() -> None:
    backend = LimitedBackend([])
    with pytest.raises(SignerError) as caught:
        request_for(Registry.load([backend]), f"{LIMITED_SCHEME}:name=k")
    message = str(caught.value)
    assert message.startswith("limited:name=k: the key offers no scheme usable")
    assert "(offered: none)" in message


def test_csr_contents(tmp_path: Path) -> None:
    key_path = write_key(tmp_path / "client.key", generate_key("p256"))
    names = [
        "client.example",
        "dns:alt.example",
        "192.0.2.7",
        "ip:2001:db8::1",
        "email:me@example.com",
        "uri:spiffe://example.org/workload",
    ]
    request = request_for(Registry.load(), str(key_path), names)
    common_name = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in common_name] == ["me"]
    organization = request.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [a.value for a in organization] == ["Example"]

    sans = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not sans.critical
    assert sans.value.get_values_for_type(x509.DNSName) == [
        "client.example",
        "alt.example",
    ]
    assert sans.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.7"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    assert sans.value.get_values_for_type(x509.RFC822Name) == ["me@example.com"]
    assert sans.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/workload"
    ]

    usage = request.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    extended = request.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(extended.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_csr_empty_subject_san_critical(tmp_path: Path) -> None:
    key_path = write_key(tmp_path / "client.key", generate_key("p256"))
    subject = parse_subject("")
    sans = [parse_san("client.example")]
    request = anyio.run(create_request, Registry.load(), str(key_path), subject, sans)
    extension = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert len(request.subject) == 0
    assert extension.critical


def test_csr_writes_out_file(tmp_path: Path) -> None:
    key_path = write_key(tmp_path / "client.key", generate_key("p256"))
    out = tmp_path / "req.csr"
    result = run_cli("csr", str(key_path), "--subject", "CN=me", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert x509.load_pem_x509_csr(out.read_bytes()).is_signature_valid


def test_csr_out_exists_rejected(tmp_path: Path) -> None:
    key_path = write_key(tmp_path / "client.key", generate_key("p256"))
    out = tmp_path / "req.csr"
    out.write_text("keep me\n")
    result = run_cli("csr", str(key_path), "--subject", "CN=me", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr == (
        f"kmsproxy: error: {out} already exists; pass --force to overwrite it\n"
    )
    assert out.read_text() == "keep me\n"


def test_csr_force_overwrites(tmp_path: Path) -> None:
    key_path = write_key(tmp_path / "client.key", generate_key("p256"))
    out = tmp_path / "req.csr"
    out.write_text("old\n")
    result = run_cli(
        "csr", str(key_path), "--subject", "CN=me", "--out", str(out), "--force"
    )
    assert result.returncode == 0, result.stderr
    assert x509.load_pem_x509_csr(out.read_bytes()).is_signature_valid


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--subject", "CN=me,,"], "invalid RFC 4514 name"),
        (["--subject", "C=Germany"], "invalid RFC 4514 name"),
        (["--subject", "CN=me", "--san", "bad_host!"], "invalid DNS name"),
        (["--subject", "CN=me", "--san", "me@example.com"], "write email:"),
        (["--subject", "CN=me", "--san", "https://example.com"], "write uri:"),
        (["--subject", "CN=me", "--san", "ip:300.1.1.1"], "not an IPv4 or IPv6"),
        (["--subject", "CN=me", "--san", "email:nobody"], "invalid e-mail"),
        (["--subject", "CN=me", "--san", "uri:relative/path"], "invalid URI"),
        (["--subject", ""], "give a non-empty --subject or a --san"),
    ],
)
def test_csr_bad_input_one_line(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    key_path = write_key(tmp_path / "client.key", generate_key("p256"))
    result = run_cli("csr", str(key_path), *arguments)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("kmsproxy: error: ")
    assert result.stderr.count("\n") == 1
    assert message in result.stderr


def test_csr_missing_key_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    result = run_cli("csr", str(missing), "--subject", "CN=me")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"{missing}: no such file" in result.stderr


def test_csr_unknown_scheme_one_line() -> None:
    result = run_cli("csr", "vault:name=k", "--subject", "CN=me")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "vault:name=k: no installed backend" in result.stderr


def test_csr_certificate_pairs_in_proxy(tmp_path: Path) -> None:
    # The client CA, as an external CA would be: openssl signs the request.
    client_ca = make_ca("csr client CA")
    ca_key, ca_cert = client_ca.write(tmp_path, "client-ca")
    client_key = generate_key("p256")
    key_path = write_key(tmp_path / "client.key", client_key)
    request_path = tmp_path / "client.csr"
    result = run_cli(
        "csr", str(key_path), "--subject", "CN=csr client,O=Example",
        "--out", str(request_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    certificate_path = tmp_path / "client.crt"
    signed = openssl(
        "x509", "-req", "-in", str(request_path), "-CA", str(ca_cert),
        "-CAkey", str(ca_key), "-CAcreateserial", "-days", "1",
        "-copy_extensions", "copy", "-out", str(certificate_path),
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    extended = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(extended.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    # The proxy pairs the key with the certificate and presents both.
    files = create_demo_files(tmp_path / "site")
    files = dataclasses.replace(files, client_ca=ca_cert)
    config = ProxyConfig(
        ca_key=files.ca_key,
        ca_certificate=files.ca_certificate,
        client_keys=[key_path],
        client_certificates=[certificate_path],
        trust=[files.upstream_ca],
        include_system_trust=False,
        listen="127.0.0.1:0",
        pac_listen=None,
        handle_signals=False,
    )

    async def round_trip() -> bytes:
        with anyio.fail_after(ROUND_TRIP_TIMEOUT_SECONDS):
            async with anyio.create_task_group() as group:
                upstream_port = await group.start(
                    serve_mtls_upstream, "127.0.0.1", upstream_context(files)
                )
                addresses = await group.start(Proxy(config).serve)
                proxy = addresses.proxy[0]
                body = await fetch_through_proxy(
                    (proxy.host, proxy.port),
                    "127.0.0.1",
                    upstream_port,
                    files.ca_certificate,
                )
                group.cancel_scope.cancel()
        return body

    body = anyio.run(round_trip)
    assert b"client certificate subject=CN=csr client,O=Example" in body


def test_csr_help_documents_san_syntax() -> None:
    result = run_cli("csr", "--help")
    assert result.returncode == 0
    for prefix in ("dns:", "ip:", "email:", "uri:"):
        assert prefix in result.stdout


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("010.0.0.1", "ambiguous IPv4 address"),
        ("ip:fe80::1%eth0", "an IPv6 zone (%eth0) cannot be in a certificate"),
        ("fe80::1%eth0", "an IPv6 zone (%eth0) cannot be in a certificate"),
        ("email:a\x07@example.com", "invalid e-mail address"),
        ("uri:https://example.com/\x01", "invalid URI"),
    ],
)
def test_san_hostile_values(value: str, reason: str) -> None:
    with pytest.raises(UserError) as raised:
        parse_san(value)
    assert reason in str(raised.value)


def test_subject_control_character() -> None:
    with pytest.raises(UserError, match="contains a control character"):
        parse_subject("CN=a\x01b")


def test_subject_unknown_type_named() -> None:
    with pytest.raises(UserError, match=r"\(unknown attribute type\)"):
        parse_subject("FOO=bar")
