"""The KMS side of a signature, byte by byte: algorithms and message types."""

from __future__ import annotations

import hashlib

import pytest

from kmsproxy.signer import SignatureScheme
from kmsproxy_awskms.algorithms import (
    KEY_SPEC_SCHEMES,
    MAX_RAW_MESSAGE_BYTES,
    SIGNING_ALGORITHMS,
    MessageType,
    message_type_for,
    sign_request,
)

BOTH = frozenset({MessageType.RAW, MessageType.DIGEST})
RAW_ONLY = frozenset({MessageType.RAW})
DIGEST_ONLY = frozenset({MessageType.DIGEST})


def test_raw_up_to_limit() -> None:
    assert message_type_for(MAX_RAW_MESSAGE_BYTES, BOTH) is MessageType.RAW


def test_digest_above_limit() -> None:
    assert message_type_for(MAX_RAW_MESSAGE_BYTES + 1, BOTH) is MessageType.DIGEST


def test_digest_when_raw_failed() -> None:
    assert message_type_for(10, DIGEST_ONLY) is MessageType.DIGEST


def test_long_message_without_digest() -> None:
    with pytest.raises(ValueError, match="4097-byte message needs MessageType"):
        message_type_for(MAX_RAW_MESSAGE_BYTES + 1, RAW_ONLY)


def test_raw_request_carries_message() -> None:
    request = sign_request(
        "alias/k", b"hello", SignatureScheme.rsa_pkcs1_sha384, MessageType.RAW
    )
    assert request == {
        "KeyId": "alias/k",
        "Message": b"hello",
        "MessageType": "RAW",
        "SigningAlgorithm": "RSASSA_PKCS1_V1_5_SHA_384",
    }


@pytest.mark.parametrize(
    ("scheme", "hash_name"),
    [
        (SignatureScheme.ecdsa_secp256r1_sha256, "sha256"),
        (SignatureScheme.ecdsa_secp384r1_sha384, "sha384"),
        (SignatureScheme.rsa_pss_rsae_sha512, "sha512"),
    ],
)
def test_digest_request_hashes_with_scheme(
    scheme: SignatureScheme, hash_name: str
) -> None:
    data = b"t" * 5000
    request = sign_request("k", data, scheme, MessageType.DIGEST)
    assert request["Message"] == hashlib.new(hash_name, data).digest()
    assert request["MessageType"] == "DIGEST"


def test_every_listed_scheme_has_algorithm() -> None:
    for schemes in KEY_SPEC_SCHEMES.values():
        for scheme in schemes:
            assert scheme in SIGNING_ALGORITHMS


def test_ed25519_has_no_algorithm() -> None:
    with pytest.raises(ValueError, match="no signing algorithm for ed25519"):
        sign_request("k", b"x", SignatureScheme.ed25519, MessageType.RAW)
