"""Selection of the client identity for a CertificateRequest (RFC 8446
section 4.3.2), and the content the client signs (section 4.4.3)."""

from __future__ import annotations

import datetime
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


def _valid_now(identity: ClientIdentity, now: datetime.datetime) -> bool:
    leaf = identity.chain[0]
    return leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc


def select_identity(
    identities: Sequence[ClientIdentity],
    server_schemes: Collection[int],
    authorities: Collection[bytes],
) -> tuple[ClientIdentity, SignatureScheme] | None:
    """Pick the identity and scheme for a CertificateRequest.

    Only identities whose signer has a scheme the server accepts are
    candidates, and those whose leaf is valid now come before the others
    (expired or not yet valid), keeping the configured order within each
    group. Step 1: the first candidate issued under a listed CA. Step 2:
    otherwise the first candidate. So an expired identity is chosen only
    when no candidate is valid. The scheme is the signer's most preferred
    one the server lists. Return None when no identity can sign, so the
    caller sends an empty Certificate and lets the server decide.
    """
    now = datetime.datetime.now(datetime.UTC)
    candidates = [
        (identity, schemes)
        for identity in identities
        if (schemes := _usable_schemes(identity, server_schemes)) and identity.chain
    ]
    # sorted() is stable, so the configured order holds within each group.
    candidates = sorted(
        candidates, key=lambda candidate: not _valid_now(candidate[0], now)
    )
    for identity, schemes in candidates:
        if authorities and _issued_by_listed_ca(identity, authorities):
            return identity, schemes[0]
    if candidates:
        identity, schemes = candidates[0]
        return identity, schemes[0]
    return None


def describe_unmatched_request(
    identities: Sequence[ClientIdentity], server_schemes: Collection[int]
) -> str:
    """Name the schemes the server accepts and those our identities offer,
    to explain an empty Certificate sent for a CertificateRequest."""
    accepted = [_scheme_name(code) for code in server_schemes]
    offered = sorted({s.name for i in identities for s in i.signer.schemes})
    return (
        "we sent no client certificate because no identity fits the server's "
        f"CertificateRequest: the server accepts {', '.join(accepted)}; "
        f"our keys offer {', '.join(offered)}"
    )


def _scheme_name(code: int) -> str:
    try:
        return SignatureScheme(code).name
    except ValueError:
        return f"0x{code:04x}"


def client_certificate_verify_content(transcript_hash: bytes) -> bytes:
    return signed_content(CLIENT_CONTEXT, transcript_hash)
