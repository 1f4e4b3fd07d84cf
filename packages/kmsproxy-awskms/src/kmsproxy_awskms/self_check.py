"""The self-check: which schemes and message types really work on a key.

A KMS-compatible service may accept a request and still return a wrong
signature. moto 5.2.5 hashes a DIGEST message a second time, and signs
RSASSA_PSS with the longest salt instead of one as long as the digest,
which TLS requires. Without this check such a signature would reach the
upstream server and end the handshake with a decrypt_error alert.

So at load, each candidate scheme signs one short message as RAW and one
message above the RAW limit as DIGEST, and each signature is verified
locally against the public key. A scheme keeps the message types that
verified; a scheme with none is dropped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import botocore.exceptions
from cryptography.exceptions import InvalidSignature

from kmsproxy.signer import PublicKey, SignatureScheme, SignerError, verify_signature
from kmsproxy_awskms.algorithms import (
    MAX_RAW_MESSAGE_BYTES,
    SIGNING_ALGORITHMS,
    MessageType,
    sign_request,
)
from kmsproxy_awskms.errors import describe_error, response_field
from kmsproxy_awskms.service import KeyAddress

logger = logging.getLogger(__name__)

# The message signed as RAW: short, and fixed so a log of KMS requests
# shows what it is.
SHORT_MESSAGE = b"kmsproxy-awskms self-check of a RAW message\n"

# The message signed as DIGEST: one byte over the RAW limit, the size at
# which a real TLS 1.2 CertificateVerify starts to need DIGEST.
LONG_MESSAGE = (SHORT_MESSAGE * (MAX_RAW_MESSAGE_BYTES // len(SHORT_MESSAGE) + 1))[
    : MAX_RAW_MESSAGE_BYTES + 1
]

_CHECKS = ((MessageType.RAW, SHORT_MESSAGE), (MessageType.DIGEST, LONG_MESSAGE))


def check_schemes(
    address: KeyAddress,
    client: Any,
    public_key: PublicKey,
    candidates: Sequence[SignatureScheme],
) -> dict[SignatureScheme, frozenset[MessageType]]:
    """Sign and verify for each candidate; return the working message types.

    Blocking: two KMS `Sign` calls per candidate. The result keeps the
    candidates' order and leaves out schemes with no working type. Raise
    `SignerError` when a call fails for a reason other than the algorithm
    (KMS unreachable, access denied), or when no scheme works at all.
    """
    working: dict[SignatureScheme, frozenset[MessageType]] = {}
    failures: dict[SignatureScheme, list[str]] = {}
    for scheme in candidates:
        usable = set()
        for message_type, message in _CHECKS:
            problem = _check_one(
                address, client, public_key, scheme, message_type, message
            )
            if problem is None:
                usable.add(message_type)
            else:
                failures.setdefault(scheme, []).append(problem)
        if usable:
            working[scheme] = frozenset(usable)
    _report(address, candidates, working, failures)
    return working


def _check_one(
    address: KeyAddress,
    client: Any,
    public_key: PublicKey,
    scheme: SignatureScheme,
    message_type: MessageType,
    message: bytes,
) -> str | None:
    """Sign `message` once; return why it failed, or None when it verified."""
    request = sign_request(address.key_id, message, scheme, message_type)
    try:
        response = client.sign(**request)
        signature = response_field(response, "Signature", bytes)
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        if code in ("ValidationException", "UnsupportedOperationException"):
            return f"{message_type} rejected ({code})"
        raise _self_check_error(address, error) from None
    except botocore.exceptions.BotoCoreError as error:
        raise _self_check_error(address, error) from None
    try:
        verify_signature(public_key, signature, message, scheme)
    except (InvalidSignature, ValueError):
        return f"{message_type} signature does not verify"
    return None


def _self_check_error(address: KeyAddress, error: Exception) -> SignerError:
    description = describe_error(error, address.key_id, address.location.endpoint)
    return SignerError(
        f"{address.uri}: the self-check Sign at {address.location.describe()} "
        f"failed: {description.reason}"
    )


def _report(
    address: KeyAddress,
    candidates: Sequence[SignatureScheme],
    working: dict[SignatureScheme, frozenset[MessageType]],
    failures: dict[SignatureScheme, list[str]],
) -> None:
    """Log what the self-check dropped; raise when nothing is left."""
    dropped = [scheme for scheme in candidates if scheme not in working]
    if not working:
        tried = "; ".join(
            f"{scheme.name} ({SIGNING_ALGORITHMS[scheme]}): "
            + ", ".join(failures.get(scheme, ["not offered"]))
            for scheme in candidates
        )
        raise SignerError(
            f"{address.uri}: no signature scheme passed the self-check at "
            f"{address.location.describe()} ({tried or 'KMS offers none'}); "
            "check that the endpoint is AWS KMS or a faithful emulator of it"
        )
    for scheme in dropped:
        logger.warning(
            "Dropping a signature scheme that failed the self-check "
            "uri=%s scheme=%s algorithm=%s problems=%s",
            address.uri,
            scheme.name,
            SIGNING_ALGORITHMS[scheme],
            ", ".join(failures[scheme]),
        )
    no_digest = [
        scheme.name
        for scheme, types in working.items()
        if MessageType.DIGEST not in types
    ]
    if no_digest:
        logger.warning(
            "DIGEST signatures failed the self-check: messages over %d bytes "
            "(a TLS 1.2 handshake with a long certificate chain) will fail "
            "uri=%s schemes=%s",
            MAX_RAW_MESSAGE_BYTES,
            address.uri,
            ",".join(no_digest),
        )
