"""Selection of the client identity for a CertificateRequest (RFC 8446
section 4.3.2), and the content the client signs (section 4.4.3)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from ..signer import SignatureScheme
from .config import ClientIdentity
from .verify import CERTIFICATE_VERIFY_SCHEMES, CLIENT_CONTEXT, signed_content


def _usable_schemes(
    identity: ClientIdentity, server_schemes: Collection[int]
) -> list[SignatureScheme]:
    return [
        scheme
        for scheme in identity.signer.schemes
        if scheme in server_schemes and scheme in CERTIFICATE_VERIFY_SCHEMES
    ]


def _issued_by_listed_ca(
    identity: ClientIdentity, authorities: Collection[bytes]
) -> bool:
    """True when a certificate of the chain is issued by, or is, a listed CA.

    Names are compared as DER, the form both sides serialise from the
    certificate, so no string normalisation is involved.
    """
    for cert in identity.chain:
        if cert.issuer.public_bytes() in authorities:
            return True
        if cert.subject.public_bytes() in authorities:
            return True
    return False


def select_identity(
    identities: Sequence[ClientIdentity],
    server_schemes: Collection[int],
    authorities: Collection[bytes],
) -> tuple[ClientIdentity, SignatureScheme] | None:
    """Pick the identity and scheme for a CertificateRequest.

    Step 1: the first identity issued under a listed CA whose signer has a
    scheme the server accepts. Step 2: otherwise the first identity with such
    a scheme. The scheme is the signer's most preferred one the server lists.
    Return None when no identity can sign, so the caller sends an empty
    Certificate and lets the server decide.
    """
    candidates = [
        (identity, schemes)
        for identity in identities
        if (schemes := _usable_schemes(identity, server_schemes)) and identity.chain
    ]
    for identity, schemes in candidates:
        if authorities and _issued_by_listed_ca(identity, authorities):
            return identity, schemes[0]
    if candidates:
        identity, schemes = candidates[0]
        return identity, schemes[0]
    return None


def client_certificate_verify_content(transcript_hash: bytes) -> bytes:
    return signed_content(CLIENT_CONTEXT, transcript_hash)
