"""TrustStore loading, chain and name verification, and the signature
scheme rules for the server's CertificateVerify."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pki import issue, make_ca

from kmsproxy.certificates import CertificateError
from kmsproxy.signer import SignatureScheme, sign_with_private_key
from kmsproxy.tls import AlertDescription, CertificateVerifyFailed, TrustStore
from kmsproxy.tls.alerts import DecryptError, IllegalParameter
from kmsproxy.tls.verify import SERVER_CONTEXT, signed_content, verify_server_signature

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
    with pytest.raises(CertificateVerifyFailed, match="unknown issuer") as caught:
        TrustStore([OTHER_CA.cert]).verify_server([SERVER.cert], "server.test")
    assert caught.value.description == AlertDescription.unknown_ca


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
