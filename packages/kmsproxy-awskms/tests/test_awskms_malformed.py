"""A KMS endpoint that responds with a malformed or oversized response.

The scripted KMS endpoint plays a hostile or broken one: it sends, for each
KMS operation, the JSON body the test gives it. Each case must end in a
one-line `SignerError`, not a `KeyError` or a body parsed whatever its size.
"""

from __future__ import annotations

import base64

import pytest
from awskms_fake import ScriptedKMS, scripted_kms
from awskms_moto import REGION, aws_environment
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsproxy import Registry, SignerError
from kmsproxy_awskms import service

__all__ = ["aws_environment", "scripted_kms"]

# moto's response shapes, trimmed to the fields the backend reads.
PUBLIC_KEY = ec.generate_private_key(ec.SECP256R1()).public_key()
PUBLIC_DER = PUBLIC_KEY.public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
DESCRIBE_KEY = {
    "KeyMetadata": {
        "KeyId": "k",
        "KeyState": "Enabled",
        "Enabled": True,
        "KeyUsage": "SIGN_VERIFY",
        "KeySpec": "ECC_NIST_P256",
    }
}
GET_PUBLIC_KEY = {
    "KeyId": "k",
    "PublicKey": base64.b64encode(PUBLIC_DER).decode(),
    "SigningAlgorithms": ["ECDSA_SHA_256"],
}


@pytest.fixture
def fake_kms(scripted_kms: ScriptedKMS, monkeypatch: pytest.MonkeyPatch) -> ScriptedKMS:
    """The scripted endpoint, with no retries: each case is one request."""
    monkeypatch.setattr(service, "MAX_ATTEMPTS", 1)
    return scripted_kms


def open_error(fake_kms: ScriptedKMS) -> str:
    uri = f"awskms:key-id=k;region={REGION};endpoint={fake_kms.endpoint}"
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(uri)
    return str(raised.value)


def test_missing_public_key(fake_kms: ScriptedKMS) -> None:
    answer = {k: v for k, v in GET_PUBLIC_KEY.items() if k != "PublicKey"}
    fake_kms.answers = {"DescribeKey": DESCRIBE_KEY, "GetPublicKey": answer}
    message = open_error(fake_kms)
    assert "KMS returned a malformed response: PublicKey is missing" in message
    assert "check that endpoint= names a KMS endpoint" in message


def test_key_spec_object(fake_kms: ScriptedKMS) -> None:
    metadata = {**DESCRIBE_KEY["KeyMetadata"], "KeySpec": {"x": 1}}
    fake_kms.answers = {"DescribeKey": {"KeyMetadata": metadata}}
    assert "has no TLS signature scheme" in open_error(fake_kms)


def test_missing_signature(fake_kms: ScriptedKMS) -> None:
    fake_kms.answers = {
        "DescribeKey": DESCRIBE_KEY,
        "GetPublicKey": GET_PUBLIC_KEY,
        "Sign": {"KeyId": "k"},
    }
    assert "Signature is missing or not bytes" in open_error(fake_kms)


def test_oversized_response(fake_kms: ScriptedKMS) -> None:
    padding = "x" * (service.MAX_RESPONSE_BYTES + 1)
    fake_kms.answers = {"DescribeKey": {**DESCRIBE_KEY, "Padding": padding}}
    message = open_error(fake_kms)
    assert "KMS returned a malformed response: " in message
    assert f"more than {service.MAX_RESPONSE_BYTES}" in message
