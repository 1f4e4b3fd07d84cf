"""TrustStore loading, chain and name verification, and the signature
scheme rules for the server's CertificateVerify."""

from __future__ import annotations

import datetime
import logging
import ssl
import subprocess
import warnings
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID
from peers import LOOPBACK, start_openssl_server
from pki import issue, make_ca

from kmsproxy.certificates import CertificateError
from kmsproxy.signer import SignatureScheme, sign_with_private_key
from kmsproxy.tls import (
    AlertDescription,
    CertificateVerifyFailed,
    TLSClientConfig,
    TrustStore,
    connect_tls,
)
from kmsproxy.tls.alerts import BadCertificate, DecryptError, IllegalParameter
from kmsproxy.tls.verify import (
    SERVER_CONTEXT,
    parse_certificate_chain,
    signed_content,
    verify_server_signature,
)

CA = make_ca()
OTHER_CA = make_ca("other CA")
SERVER = issue(CA, "server", dns_names=("server.test",), ip_addresses=("::1",))
OFFERED = [SignatureScheme.ecdsa_secp256r1_sha256, SignatureScheme.rsa_pss_rsae_sha256]


def write_bundle(path: Path, *issued: object) -> Path:
    path.write_bytes(b"".join(i.chain_pem() for i in issued))  # type: ignore[attr-defined]
    return path


def test_load_extra_bundle(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "ca.pem", CA, OTHER_CA)
    store = TrustStore.load([bundle], include_system=False)
    assert store.certificates == [CA.cert, OTHER_CA.cert]


def test_load_missing_bundle(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(
        CertificateError, match=r"missing\.pem: cannot read trust bundle"
    ):
        TrustStore.load([missing], include_system=False)


def test_load_empty_bundle(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("# no certificates here\n")
    with pytest.raises(
        CertificateError, match=r"empty\.pem: trust bundle contains no PEM certificate"
    ):
        TrustStore.load([empty], include_system=False)


def test_load_malformed_bundle(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(CertificateError, match=r"bad\.pem: invalid PEM trust bundle"):
        TrustStore.load([bad], include_system=False)


def test_load_nothing() -> None:
    with pytest.raises(CertificateError, match="no trusted CA certificates"):
        TrustStore.load([], include_system=False)


def test_load_system_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cafile = write_bundle(tmp_path / "cafile.pem", CA)
    capath = tmp_path / "certs"
    capath.mkdir()
    write_bundle(capath / "0a1b2c3d.0", OTHER_CA)
    (capath / "README").write_text("not a certificate")
    (capath / "deadbeef.0").write_text("corrupt")
    broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    (capath / "deadbeef.1").write_text(broken)
    paths = ssl.DefaultVerifyPaths(str(cafile), str(capath), "", "", "", "")
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: paths)
    store = TrustStore.load()
    assert store.certificates == [CA.cert, OTHER_CA.cert]


def negative_serial_certificate() -> bytes:
    """Return a PEM certificate with a negative serial number, which
    cryptography 50 loads with a CryptographyDeprecationWarning (Debian's
    bundle has a CA with such a serial).

    A builder rejects such serials, so the first serial byte is changed
    after signing. The length stays the same and the signature is never
    checked here.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "negative serial CA")])
    now = datetime.datetime.now(datetime.UTC)
    positive = bytes.fromhex("7e7e7e7e7e")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(positive, "big"))
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    negative = bytes.fromhex("fe7e7e7e7e")
    assert der.count(b"\x02\x05" + positive) == 1
    der = der.replace(b"\x02\x05" + positive, b"\x02\x05" + negative)
    with pytest.warns(CryptographyDeprecationWarning):
        x509.load_der_x509_certificate(der)
    return ssl.DER_cert_to_PEM_cert(der).encode()


def test_load_system_skips_warned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cafile = tmp_path / "cafile.pem"
    cafile.write_bytes(negative_serial_certificate() + CA.chain_pem())
    paths = ssl.DefaultVerifyPaths(str(cafile), "", "", "", "", "")
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: paths)
    caplog.set_level(logging.DEBUG, logger="kmsproxy.tls.verify")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = TrustStore.load()
        store.verify_server([SERVER.cert], "server.test")
    assert store.certificates == [CA.cert]
    assert [str(w.message) for w in caught] == []
    assert "Skipped system CA certificate" in caplog.text
    # The log names which certificate of the file was skipped: the first.
    assert "index=0 " in caplog.text


def test_parse_negative_serial() -> None:
    der = ssl.PEM_cert_to_DER_cert(negative_serial_certificate().decode())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BadCertificate, match="serial number") as error:
            parse_certificate_chain([SERVER.cert.public_bytes(Encoding.DER), der])
    assert str(error.value).startswith("certificate 1 in the chain is invalid")
    assert [str(w.message) for w in caught] == []


def test_parse_invalid_version() -> None:
    # The version field is [0] EXPLICIT INTEGER at the start of
    # TBSCertificate; 1 (X.509 v2) is not one cryptography accepts.
    der = SERVER.cert.public_bytes(Encoding.DER)
    version_v3 = bytes.fromhex("a003020102")
    assert der.count(version_v3) == 1
    der = der.replace(version_v3, bytes.fromhex("a003020101"))
    with pytest.raises(BadCertificate, match="not a valid X509 version"):
        parse_certificate_chain([der])


def test_verify_dns_name() -> None:
    chain = TrustStore([CA.cert]).verify_server([SERVER.cert], "server.test")
    assert chain == [SERVER.cert, CA.cert]


def test_verify_trailing_dot() -> None:
    chain = TrustStore([CA.cert]).verify_server([SERVER.cert], "server.test.")
    assert chain[0] == SERVER.cert


def test_verify_ip_address() -> None:
    chain = TrustStore([CA.cert]).verify_server([SERVER.cert], "::1")
    assert chain[0] == SERVER.cert


def test_verify_ip_not_dns() -> None:
    # An IP literal matches only IPAddress SANs, never a DNSName SAN.
    leaf = issue(CA, "server", dns_names=("127.0.0.1",)).cert
    with pytest.raises(CertificateVerifyFailed, match=r"does not match '127\.0\.0\.1'"):
        TrustStore([CA.cert]).verify_server([leaf], "127.0.0.1")


def test_verify_wrong_name() -> None:
    with pytest.raises(CertificateVerifyFailed) as caught:
        TrustStore([CA.cert]).verify_server([SERVER.cert], "other.test")
    assert str(caught.value) == (
        "certificate for 'server.test', '::1' does not match 'other.test'"
    )
    assert caught.value.description == AlertDescription.bad_certificate


def test_verify_unknown_issuer() -> None:
    with pytest.raises(CertificateVerifyFailed) as caught:
        TrustStore([OTHER_CA.cert]).verify_server([SERVER.cert], "server.test")
    issuer = CA.cert.subject.rfc4514_string()
    assert str(caught.value).startswith(
        f"certificate not trusted: issuer {issuer!r} of 'CN=server' is not in "
        "the trust store; add that CA's certificate with --trust FILE"
    )
    assert caught.value.description == AlertDescription.unknown_ca


def test_verify_untrusted_root_sent() -> None:
    with pytest.raises(CertificateVerifyFailed) as caught:
        TrustStore([OTHER_CA.cert]).verify_server([SERVER.cert, CA.cert], "server.test")
    subject = CA.cert.subject.rfc4514_string()
    assert f"{subject!r} is self-signed and not in the trust store" in str(caught.value)
    assert caught.value.description == AlertDescription.unknown_ca


def test_self_signed_shows_fingerprint() -> None:
    """The message names the SHA-256 fingerprint to check before trusting."""
    with pytest.raises(CertificateVerifyFailed) as caught:
        TrustStore([OTHER_CA.cert]).verify_server([SERVER.cert, CA.cert], "server.test")
    fingerprint = CA.cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert f"SHA-256 fingerprint {fingerprint}" in str(caught.value)


def test_verify_not_yet_valid() -> None:
    now = datetime.datetime.now(datetime.UTC)
    leaf = issue(
        CA,
        "server",
        dns_names=("server.test",),
        not_before=now + datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=2),
    ).cert
    with pytest.raises(CertificateVerifyFailed, match="not valid now"):
        TrustStore([CA.cert]).verify_server([leaf], "server.test")


def test_verify_client_certificate_as_server() -> None:
    leaf = issue(CA, "client", dns_names=("server.test",), client=True).cert
    with pytest.raises(CertificateVerifyFailed, match="EKU") as caught:
        TrustStore([CA.cert]).verify_server([leaf], "server.test")
    assert caught.value.description == AlertDescription.bad_certificate


def test_verify_underscore_name() -> None:
    # The CONNECT parser allows "_" in host names; cryptography's DNSName
    # does not, and the server did nothing wrong.
    with pytest.raises(CertificateVerifyFailed) as caught:
        TrustStore([CA.cert]).verify_server([SERVER.cert], "a_b.test")
    assert "cannot verify host name 'a_b.test'" in str(caught.value)
    assert caught.value.description == AlertDescription.bad_certificate


def test_verify_ed25519_ca_reason() -> None:
    # cryptography's verifier forbids Ed25519 in chains, so the CA is known
    # but unusable: the reason must say so, not "unknown issuer".
    ed25519_ca = make_ca("ed25519 CA", "ed25519")
    leaf = issue(ed25519_ca, "server", dns_names=("server.test",)).cert
    with pytest.raises(CertificateVerifyFailed) as caught:
        TrustStore([ed25519_ca.cert]).verify_server([leaf], "server.test")
    message = str(caught.value)
    assert "Forbidden public key algorithm: Ed25519" in message
    assert "unknown issuer" not in message
    assert "add the CA" not in message
    assert "AlgorithmIdentifier" not in message
    assert caught.value.description == AlertDescription.bad_certificate


def openssl_self_signed(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """Make a self-signed server certificate the common way, with
    `openssl req -x509`, which marks it cA:TRUE. Return (cert, key)."""
    cert = directory / f"self-signed-{name}.crt"
    key = directory / f"self-signed-{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={name}",
            "-addext", f"subjectAltName=DNS:{name},DNS:*.{name}.test,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_self_signed_ca_leaf_trusted(tmp_path: Path) -> None:
    cert_path, _ = openssl_self_signed(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca
    store = TrustStore.load([cert_path], include_system=False)
    assert store.verify_server([cert], "localhost") == [cert]
    assert store.verify_server([cert], "127.0.0.1") == [cert]
    assert store.verify_server([cert], "a.localhost.test") == [cert]


def test_self_signed_wrong_name(tmp_path: Path) -> None:
    cert_path, _ = openssl_self_signed(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    store = TrustStore.load([cert_path], include_system=False)
    for name in ("other.test", "a.b.localhost.test", "::1", "localhost.test"):
        with pytest.raises(CertificateVerifyFailed, match="does not match"):
            store.verify_server([cert], name)


def test_self_signed_untrusted(tmp_path: Path) -> None:
    # Only an exact match with a trusted certificate makes it an anchor.
    cert_path, _ = openssl_self_signed(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    other_path, _ = openssl_self_signed(tmp_path, "other")
    store = TrustStore.load([other_path], include_system=False)
    with pytest.raises(CertificateVerifyFailed):
        store.verify_server([cert], "localhost")


def test_self_signed_expired() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=3))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CertificateVerifyFailed, match="expired at") as caught:
        TrustStore([cert]).verify_server([cert], "localhost")
    assert caught.value.description == AlertDescription.certificate_expired


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_self_signed_s_server(tmp_path: Path) -> None:
    cert, key = openssl_self_signed(tmp_path)
    trust = TrustStore.load([cert], include_system=False)
    with start_openssl_server(tmp_path, cert, key, require_client_cert=False) as peer:
        transport = await anyio.connect_tcp(LOOPBACK, peer.port)
        async with transport:
            stream = await connect_tls(
                transport, TLSClientConfig("localhost", (), trust)
            )
            await stream.aclose()
    assert stream.peer_chain == [x509.load_pem_x509_certificate(cert.read_bytes())]


def server_signature(scheme: SignatureScheme, transcript_hash: bytes) -> bytes:
    content = signed_content(SERVER_CONTEXT, transcript_hash)
    assert isinstance(SERVER.key, ec.EllipticCurvePrivateKey)
    return sign_with_private_key(SERVER.key, content, scheme)


def test_server_signature_valid() -> None:
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    signature = server_signature(scheme, bytes(32))
    verify_server_signature(SERVER.cert, scheme, signature, bytes(32), OFFERED)


def test_server_signature_other_transcript() -> None:
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    signature = server_signature(scheme, bytes(32))
    with pytest.raises(DecryptError):
        verify_server_signature(
            SERVER.cert, scheme, signature, bytes(31) + b"\x01", OFFERED
        )


def test_server_signature_scheme_not_offered() -> None:
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    signature = server_signature(scheme, bytes(32))
    with pytest.raises(IllegalParameter, match="did not offer"):
        verify_server_signature(SERVER.cert, scheme, signature, bytes(32), OFFERED[1:])


def test_server_signature_wrong_key_type() -> None:
    scheme = SignatureScheme.rsa_pss_rsae_sha256
    with pytest.raises(IllegalParameter, match="does not fit"):
        verify_server_signature(SERVER.cert, scheme, b"\x00" * 64, bytes(32), OFFERED)


def test_server_signature_unknown_scheme() -> None:
    with pytest.raises(IllegalParameter, match="unknown scheme 0xfefe"):
        verify_server_signature(SERVER.cert, 0xFEFE, b"", bytes(32), OFFERED)
