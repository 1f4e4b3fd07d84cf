"""AWS KMS key specs and signing algorithms, mapped to TLS SignatureSchemes.

No I/O here: this module turns a TLS scheme and a message into the
parameters of one KMS `Sign` request, and back. The names on the KMS side
are those of the KMS API reference (`KeySpec`, `SigningAlgorithm`,
`MessageType`).
"""

from __future__ import annotations

import enum
from typing import TypedDict

from cryptography.hazmat.primitives import hashes

from kmsproxy.signer import SignatureScheme

# KMS `Sign` accepts a RAW message of at most 4096 bytes (KMS API reference,
# Sign, parameter Message). A longer message must be hashed here and sent as
# a DIGEST.
MAX_RAW_MESSAGE_BYTES = 4096

# The key usage a key needs for `Sign` (KMS API reference, CreateKey).
SIGN_VERIFY = "SIGN_VERIFY"

# KMS key spec -> the TLS schemes its key can produce, most preferred first.
# RSA keys list RSA-PSS first because TLS 1.3 accepts only PSS for RSA.
# ECC_SECG_P256K1, SM2 and the ML-DSA specs have no TLS 1.3 scheme and are
# left out.
KEY_SPEC_SCHEMES: dict[str, tuple[SignatureScheme, ...]] = {
    "ECC_NIST_P256": (SignatureScheme.ecdsa_secp256r1_sha256,),
    "ECC_NIST_P384": (SignatureScheme.ecdsa_secp384r1_sha384,),
    "ECC_NIST_P521": (SignatureScheme.ecdsa_secp521r1_sha512,),
    **{
        f"RSA_{bits}": (
            SignatureScheme.rsa_pss_rsae_sha256,
            SignatureScheme.rsa_pss_rsae_sha384,
            SignatureScheme.rsa_pss_rsae_sha512,
            SignatureScheme.rsa_pkcs1_sha256,
            SignatureScheme.rsa_pkcs1_sha384,
            SignatureScheme.rsa_pkcs1_sha512,
        )
        for bits in (2048, 3072, 4096)
    },
}

# TLS scheme -> KMS SigningAlgorithm. KMS signs RSASSA_PSS with a salt as
# long as the digest, which is what TLS requires (RFC 8446 section 4.2.3).
SIGNING_ALGORITHMS: dict[SignatureScheme, str] = {
    SignatureScheme.ecdsa_secp256r1_sha256: "ECDSA_SHA_256",
    SignatureScheme.ecdsa_secp384r1_sha384: "ECDSA_SHA_384",
    SignatureScheme.ecdsa_secp521r1_sha512: "ECDSA_SHA_512",
    SignatureScheme.rsa_pss_rsae_sha256: "RSASSA_PSS_SHA_256",
    SignatureScheme.rsa_pss_rsae_sha384: "RSASSA_PSS_SHA_384",
    SignatureScheme.rsa_pss_rsae_sha512: "RSASSA_PSS_SHA_512",
    SignatureScheme.rsa_pkcs1_sha256: "RSASSA_PKCS1_V1_5_SHA_256",
    SignatureScheme.rsa_pkcs1_sha384: "RSASSA_PKCS1_V1_5_SHA_384",
    SignatureScheme.rsa_pkcs1_sha512: "RSASSA_PKCS1_V1_5_SHA_512",
}


class MessageType(enum.StrEnum):
    """The `MessageType` of a KMS `Sign` request."""

    RAW = "RAW"
    DIGEST = "DIGEST"


class SignRequest(TypedDict):
    """The parameters of one KMS `Sign` call, as botocore takes them."""

    KeyId: str
    Message: bytes
    MessageType: str
    SigningAlgorithm: str


def message_type_for(length: int, usable: frozenset[MessageType]) -> MessageType:
    """Choose how a message of `length` bytes goes to KMS.

    RAW is preferred while the message fits, because KMS then hashes the
    message itself and nothing depends on the service's DIGEST handling.
    Above `MAX_RAW_MESSAGE_BYTES`, as for the CertificateVerify of a TLS 1.2
    handshake with a long certificate chain, only DIGEST is possible.
    `usable` lists the types that passed the self-check for the scheme.
    Raise `ValueError` when no usable type can carry the message.
    """
    if length <= MAX_RAW_MESSAGE_BYTES and MessageType.RAW in usable:
        return MessageType.RAW
    if MessageType.DIGEST in usable:
        return MessageType.DIGEST
    raise ValueError(
        f"a {length}-byte message needs MessageType DIGEST (RAW takes at most "
        f"{MAX_RAW_MESSAGE_BYTES} bytes), but DIGEST signatures from this KMS "
        "endpoint failed the self-check at load"
    )


def sign_request(
    key_id: str, data: bytes, scheme: SignatureScheme, message_type: MessageType
) -> SignRequest:
    """Build the `Sign` parameters that sign `data` with `scheme`.

    For DIGEST, `data` is hashed here with the scheme's hash, so KMS signs
    exactly what a local key would sign for the same message.
    """
    algorithm = SIGNING_ALGORITHMS.get(scheme)
    digest = scheme.hash_algorithm
    if algorithm is None or digest is None:
        raise ValueError(f"AWS KMS has no signing algorithm for {scheme.name}")
    message = data
    if message_type is MessageType.DIGEST:
        hasher = hashes.Hash(digest)
        hasher.update(data)
        message = hasher.finalize()
    return SignRequest(
        KeyId=key_id,
        Message=message,
        MessageType=message_type.value,
        SigningAlgorithm=algorithm,
    )
