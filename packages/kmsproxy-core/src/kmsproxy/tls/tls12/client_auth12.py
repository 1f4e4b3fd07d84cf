"""Selection of the client identity for a TLS 1.2 CertificateRequest
(RFC 5246 section 7.4.4).

TLS 1.2 names the acceptable key types in certificate_types and allows
RSASSA-PKCS1-v1_5 in CertificateVerify, which TLS 1.3 forbids, so an RSA
token without PSS can authenticate here.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import rsa

from ...signer import SignatureScheme
from ..config import ClientIdentity
from .messages12 import CertificateRequest12, ClientCertificateType

# Schemes we never sign with: SHA-1 is broken for signatures (RFC 9155).
_REJECTED_SCHEMES = frozenset(
    {SignatureScheme.rsa_pkcs1_sha1, SignatureScheme.ecdsa_sha1}
)


def _certificate_type(identity: ClientIdentity) -> ClientCertificateType:
    # ecdsa_sign also covers EdDSA keys (RFC 8422 section 5.5).
    if isinstance(identity.signer.public_key(), rsa.RSAPublicKey):
        return ClientCertificateType.rsa_sign
    return ClientCertificateType.ecdsa_sign


def _issued_by_listed_ca(
    identity: ClientIdentity, authorities: Sequence[bytes]
) -> bool:
    """True when a certificate of the chain is, or is issued by, a listed CA
    (names compared as DER, as the server encodes them)."""
    return any(
        cert.issuer.public_bytes() in authorities
        or cert.subject.public_bytes() in authorities
        for cert in identity.chain
    )


def select_identity12(
    identities: Sequence[ClientIdentity], request: CertificateRequest12
) -> tuple[ClientIdentity, SignatureScheme] | None:
    """Pick the identity and scheme for a CertificateRequest.

    Step 1: keep identities whose key type the server lists and whose signer
    has a scheme the server accepts. Step 2: prefer the first one issued
    under a listed CA, else take the first. The scheme is the signer's most
    preferred one that the server lists. Return None when none fits, so the
    caller sends an empty Certificate and the server decides.
    """
    candidates = []
    for identity in identities:
        if not identity.chain:
            continue
        if _certificate_type(identity) not in request.certificate_types:
            continue
        schemes = [
            scheme
            for scheme in identity.signer.schemes
            if scheme in request.signature_algorithms
            and scheme not in _REJECTED_SCHEMES
        ]
        if schemes:
            candidates.append((identity, schemes[0]))
    authorities = request.certificate_authorities
    for identity, scheme in candidates:
        if authorities and _issued_by_listed_ca(identity, authorities):
            return identity, scheme
    return candidates[0] if candidates else None
