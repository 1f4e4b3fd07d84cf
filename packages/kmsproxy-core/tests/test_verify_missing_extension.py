"""Server chains that lack an extension the verification profile requires.

OpenSSL 3.0's `req -x509` makes a CA without keyUsage, and such a CA is a
common first try at a test setup. The error names the certificate, the
extension and the fix.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from pki import make_ca

from kmsproxy.tls import CertificateVerifyFailed, TrustStore

# Validity around now, long enough for one test.
VALIDITY = datetime.timedelta(days=1)


def certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    extensions: list[x509.ExtensionType],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - VALIDITY)
        .not_valid_after(now + VALIDITY)
    )
    for extension in extensions:
        builder = builder.add_extension(
            extension, critical=isinstance(extension, x509.BasicConstraints)
        )
    return builder.sign(issuer_key, hashes.SHA256())


def verify(tmp_path: Path, ca: x509.Certificate, leaf: x509.Certificate) -> str:
    """Verify `leaf` for localhost against `ca`; return the failure message."""
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(Encoding.PEM))
    trust = TrustStore.load([ca_path], include_system=False)
    with pytest.raises(CertificateVerifyFailed) as raised:
        trust.verify_server([leaf], "localhost")
    return str(raised.value)


def chain_message(tmp_path: Path, *, ca_key_usage: bool, leaf_aki: bool) -> str:
    """Build a CA and a localhost leaf, leaving out the named extensions,
    and return the message of the failed verification."""
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    if ca_key_usage:
        full = make_ca("test CA")
        ca, ca_key = full.cert, full.key
    else:
        bare_key = ec.generate_private_key(ec.SECP256R1())
        ca_extensions: list[x509.ExtensionType] = [
            x509.BasicConstraints(ca=True, path_length=None),
            x509.SubjectKeyIdentifier.from_public_key(bare_key.public_key()),
        ]
        ca = certificate("test CA", bare_key, "test CA", bare_key, ca_extensions)
        ca_key = bare_key
    leaf_extensions: list[x509.ExtensionType] = [
        x509.SubjectAlternativeName([x509.DNSName("localhost")])
    ]
    if leaf_aki:
        leaf_extensions.append(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
        )
    leaf = certificate("localhost", leaf_key, "test CA", ca_key, leaf_extensions)
    return verify(tmp_path, ca, leaf)


def test_ca_without_key_usage(tmp_path: Path) -> None:
    message = chain_message(tmp_path, ca_key_usage=False, leaf_aki=True)
    assert "'CN=test CA'" in message
    assert "no keyUsage extension (2.5.29.15)" in message
    assert "-addext 'keyUsage=critical,keyCertSign,cRLSign'" in message


def test_leaf_without_authority_key_id(tmp_path: Path) -> None:
    message = chain_message(tmp_path, ca_key_usage=True, leaf_aki=False)
    assert message.startswith("certificate 'CN=localhost' has no")
    assert "authorityKeyIdentifier extension (2.5.29.35)" in message
    assert "reissue it with authorityKeyIdentifier" in message
