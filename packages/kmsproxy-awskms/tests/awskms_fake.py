"""A scripted KMS endpoint on loopback that signs with a software EC key.

moto cannot return the failures a real KMS returns at Sign: throttling,
a key disabled or scheduled for deletion after the proxy opened it, or
AccessDenied. `ScriptedKMS` speaks the JSON 1.1 protocol as botocore sends
it (POST /, `X-Amz-Target: TrentService.<Operation>`, content type
`application/x-amz-json-1.1`). It responds to DescribeKey, GetPublicKey and
Sign for one ECC_NIST_P256 key, and a test can make it fail the next N Sign
requests with a given error code, or send a fixed body for an operation.
It counts every request by operation, so a test can tell how often botocore
retried.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from awskms_moto import REGION
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from peers import LOOPBACK

from kmsproxy_awskms import service

KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_ARN = f"arn:aws:kms:{REGION}:111122223333:key/{KEY_ID}"

# HTTP status of every scripted error. KMS sends throttling, key state and
# access errors as client errors with status 400.
CLIENT_ERROR_STATUS = 400

# Largest request body the fake reads. A Sign request carries at most 4096
# bytes of message, base64-encoded inside JSON.
MAX_REQUEST_BYTES = 64 * 1024

# Seconds to wait for the server thread to stop after shutdown().
STOP_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class ScriptedError:
    """An error response: the `__type` and `message` of a JSON 1.1 error body."""

    code: str
    message: str
    status: int = CLIENT_ERROR_STATUS


class ScriptedKMS(ThreadingHTTPServer):
    """The fake endpoint, with Sign failures scripted by `fail_next_signs`."""

    def __init__(self) -> None:
        super().__init__((LOOPBACK, 0), _Handler)
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._sign_failures: list[ScriptedError] = []
        # Response bodies, by operation, sent in place of the key's own.
        self.answers: dict[str, Any] = {}

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}"

    def uri(self) -> str:
        return f"awskms:key-id={KEY_ID};region={REGION};endpoint={self.endpoint}"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    def fail_next_signs(self, count: int, code: str, message: str) -> None:
        """Fail the next `count` Sign requests with error `code`."""
        with self._lock:
            self._sign_failures = [ScriptedError(code, message)] * count

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    def count(self, operation: str) -> int:
        with self._lock:
            return self.requests[operation]

    def respond(self, operation: str, request: dict[str, Any]) -> Any:
        """Return the response for `operation`: a JSON value, raw bytes, or
        a `ScriptedError`."""
        with self._lock:
            self.requests[operation] += 1
            if operation == "Sign" and self._sign_failures:
                return self._sign_failures.pop(0)
        if operation in self.answers:
            return self.answers[operation]
        if operation == "DescribeKey":
            return {"KeyMetadata": _key_metadata()}
        if operation == "GetPublicKey":
            der = self.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            return {
                "KeyId": KEY_ARN,
                "KeySpec": "ECC_NIST_P256",
                "KeyUsage": "SIGN_VERIFY",
                "PublicKey": base64.b64encode(der).decode(),
                "SigningAlgorithms": ["ECDSA_SHA_256"],
            }
        if operation == "Sign":
            return self._sign(request)
        return ScriptedError("UnknownOperationException", operation)

    def _sign(self, request: dict[str, Any]) -> Any:
        if request.get("SigningAlgorithm") != "ECDSA_SHA_256":
            return ScriptedError(
                "InvalidKeyUsageException", "only ECDSA_SHA_256 is supported"
            )
        message = base64.b64decode(request["Message"])
        algorithm: ec.ECDSA
        if request.get("MessageType") == "DIGEST":
            algorithm = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
        else:
            algorithm = ec.ECDSA(hashes.SHA256())
        signature = self.private_key.sign(message, algorithm)
        return {
            "KeyId": KEY_ARN,
            "Signature": base64.b64encode(signature).decode(),
            "SigningAlgorithm": "ECDSA_SHA_256",
        }


def _key_metadata() -> dict[str, Any]:
    return {
        "KeyId": KEY_ID,
        "Arn": KEY_ARN,
        "KeyState": "Enabled",
        "Enabled": True,
        "KeyUsage": "SIGN_VERIFY",
        "KeySpec": "ECC_NIST_P256",
        "SigningAlgorithms": ["ECDSA_SHA_256"],
    }


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedKMS

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length", "0")), MAX_REQUEST_BYTES)
        request = json.loads(self.rfile.read(length) or b"{}")
        operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
        answer = self.server.respond(operation, request)
        status = 200
        if isinstance(answer, ScriptedError):
            status = answer.status
            answer = {"__type": answer.code, "message": answer.message}
        body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def scripted_kms(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedKMS]:
    """Start a `ScriptedKMS` for one test, with fresh `KMSService`s."""
    monkeypatch.setattr(service, "_SERVICES", {})
    server = ScriptedKMS()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=STOP_TIMEOUT_SECONDS)
