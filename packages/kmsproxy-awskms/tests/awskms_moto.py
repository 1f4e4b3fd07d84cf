"""moto's KMS server on loopback, and an AWS environment that reaches nothing else.

`moto_kms` (module scope) starts `moto_server` from the venv on a free
127.0.0.1 port, waits (bounded) until it accepts connections, and stops it by PID.
`aws_environment` (module scope, autouse where imported) sets dummy
credentials, a region, AWS_EC2_METADATA_DISABLED=true and empty config,
credentials and boto files under a temporary directory, so neither the tests nor
the code under test can pick up a real profile or reach a metadata
address. Every URI the tests build carries `endpoint=` pointing at moto.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from peers import LOOPBACK, free_port

from kmsproxy.signer import PublicKey
from kmsproxy_awskms import service
from kmsproxy_awskms import signer as signer_module

REGION = "eu-west-1"

# Dummy values: moto accepts any credentials; these reach nothing else.
DUMMY_ACCESS_KEY_ID = "AKIAKMSPROXYTEST0001"
DUMMY_SECRET_ACCESS_KEY = "kmsproxy-test-secret-not-a-real-key"

# moto_server starts in about a second on an idle machine (an estimate);
# 20 s leaves room for a loaded CI runner.
MOTO_READY_TIMEOUT_SECONDS = 20.0
MOTO_POLL_SECONDS = 0.05
MOTO_STOP_TIMEOUT_SECONDS = 5.0

# Variables that could point botocore at real credentials or a role.
_CREDENTIAL_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_CREDENTIAL_FILE",
)


@pytest.fixture(scope="module", autouse=True)
def aws_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Set a closed AWS environment for the module; yield its directory."""
    directory = tmp_path_factory.mktemp("aws")
    (directory / "config").write_text("")
    (directory / "credentials").write_text("")
    (directory / "boto.cfg").write_text("")
    with pytest.MonkeyPatch.context() as patch:
        for name in _CREDENTIAL_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY_ID)
        patch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_ACCESS_KEY)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", str(directory / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(directory / "credentials"))
        # botocore's boto-config provider reads ~/.boto unless this is set.
        patch.setenv("BOTO_CONFIG", str(directory / "boto.cfg"))
        patch.setenv("AWS_REGION", REGION)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        yield directory


@dataclass
class MotoKMS:
    """A running `moto_server`; `endpoint` is its http://127.0.0.1:PORT URL."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def client(self) -> Any:
        """Return a boto3 KMS client for setting up keys (test side only)."""
        return boto3.client(
            "kms",
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id=DUMMY_ACCESS_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET_ACCESS_KEY,
        )

    def create_key(self, key_spec: str, key_usage: str = "SIGN_VERIFY") -> str:
        """Create a key in moto and return its key id."""
        metadata = self.client().create_key(KeyUsage=key_usage, KeySpec=key_spec)
        return str(metadata["KeyMetadata"]["KeyId"])

    def uri(self, key_id: str, **extra: str) -> str:
        """Return the `awskms:` URI of `key_id` on this server."""
        attributes = {"key-id": key_id, "region": REGION, "endpoint": self.endpoint}
        attributes.update({name.replace("_", "-"): v for name, v in extra.items()})
        return "awskms:" + ";".join(f"{n}={v}" for n, v in attributes.items())

    def public_key(self, key_id: str) -> PublicKey:
        der = self.client().get_public_key(KeyId=key_id)["PublicKey"]
        key = serialization.load_der_public_key(der)
        assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        return key

    def pause(self) -> None:
        """Pause the server (SIGSTOP): connections hang, and its state stays."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        # A paused process must continue to act on SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(timeout=MOTO_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=MOTO_STOP_TIMEOUT_SECONDS)


def moto_server_path() -> Path:
    """Return the venv's `moto_server`; fail naming the package if missing."""
    path = Path(sys.executable).parent / "moto_server"
    if not path.exists():
        pytest.fail(
            f"{path} not found: install moto[server] (it is in requirements-dev.lock)"
        )
    return path


def start_moto(directory: Path) -> MotoKMS:
    """Start `moto_server` on a free loopback port; wait until it accepts."""
    port = free_port()
    log_path = directory / f"moto-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(moto_server_path()), "-H", LOOPBACK, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = MotoKMS(process, port, log_path)
    deadline = time.monotonic() + MOTO_READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"moto_server exited with status {process.returncode}: {server.log()}"
            )
        with contextlib.suppress(OSError):
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return server
        time.sleep(MOTO_POLL_SECONDS)
    server.stop()
    raise AssertionError(
        f"moto_server did not listen on {LOOPBACK}:{port} within "
        f"{MOTO_READY_TIMEOUT_SECONDS} s: {server.log()}"
    )


@pytest.fixture(scope="module")
def moto_kms(
    aws_environment: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MotoKMS]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SignCall:
    """One KMS `Sign` request the code under test sent."""

    key_id: str
    message: bytes
    message_type: str
    signing_algorithm: str


@pytest.fixture
def sign_calls(monkeypatch: pytest.MonkeyPatch) -> list[SignCall]:
    """Record every `Sign` request of keys opened during the test.

    The key still opens through the registry and the entry point; only the
    botocore client gets an event handler that records the parameters.
    """
    calls: list[SignCall] = []
    create_client = service.create_client

    def record(params: dict[str, Any], **_: object) -> None:
        calls.append(
            SignCall(
                params["KeyId"],
                params["Message"],
                params["MessageType"],
                params["SigningAlgorithm"],
            )
        )

    def create_recording_client(*args: Any) -> Any:
        client = create_client(*args)
        client.meta.events.register("provide-client-params.kms.Sign", record)
        return client

    monkeypatch.setattr(signer_module, "create_client", create_recording_client)
    return calls
