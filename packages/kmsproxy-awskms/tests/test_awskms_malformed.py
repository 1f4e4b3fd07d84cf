"""A KMS endpoint that responds with a malformed or oversized response.

A small HTTP server on loopback stands in for a hostile or broken endpoint:
it answers each KMS operation with the JSON body the test gives it. Each
case must end in a one-line `SignerError`, not a `KeyError` or a body
parsed whatever its size.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from awskms_moto import REGION, aws_environment
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsproxy import Registry, SignerError
from kmsproxy_awskms import service

__all__ = ["aws_environment"]

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


class FakeKMS(ThreadingHTTPServer):
    """Respond to `TrentService.OPERATION` with `answers[OPERATION]` as JSON."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers: dict[str, Any] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeKMS

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
        answer = self.server.answers.get(operation, {})
        body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def fake_kms(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKMS]:
    monkeypatch.setattr(service, "_SERVICES", {})
    monkeypatch.setattr(service, "MAX_ATTEMPTS", 1)
    server = FakeKMS()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def open_error(fake_kms: FakeKMS) -> str:
    uri = f"awskms:key-id=k;region={REGION};endpoint={fake_kms.endpoint}"
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(uri)
    return str(raised.value)


def test_missing_public_key(fake_kms: FakeKMS) -> None:
    answer = {k: v for k, v in GET_PUBLIC_KEY.items() if k != "PublicKey"}
    fake_kms.answers = {"DescribeKey": DESCRIBE_KEY, "GetPublicKey": answer}
    message = open_error(fake_kms)
    assert "KMS returned a malformed response: PublicKey is missing" in message
    assert "check that endpoint= names a KMS endpoint" in message


def test_key_spec_object(fake_kms: FakeKMS) -> None:
    metadata = {**DESCRIBE_KEY["KeyMetadata"], "KeySpec": {"x": 1}}
    fake_kms.answers = {"DescribeKey": {"KeyMetadata": metadata}}
    assert "has no TLS signature scheme" in open_error(fake_kms)


def test_missing_signature(fake_kms: FakeKMS) -> None:
    fake_kms.answers = {
        "DescribeKey": DESCRIBE_KEY,
        "GetPublicKey": GET_PUBLIC_KEY,
        "Sign": {"KeyId": "k"},
    }
    assert "Signature is missing or not bytes" in open_error(fake_kms)


def test_oversized_response(fake_kms: FakeKMS) -> None:
    padding = "x" * (service.MAX_RESPONSE_BYTES + 1)
    fake_kms.answers = {"DescribeKey": {**DESCRIBE_KEY, "Padding": padding}}
    message = open_error(fake_kms)
    assert "KMS returned a malformed response: " in message
    assert f"more than {service.MAX_RESPONSE_BYTES}" in message
