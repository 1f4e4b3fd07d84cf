"""KMS stops responding mid-run: the proxy returns 502, then recovers by itself.

Two kinds of outage. moto paused with SIGSTOP still accepts connections,
but no request gets a response (a hung endpoint) until SIGCONT. A
forwarder process in front of moto, once killed, leaves a port that
refuses connections (a stopped endpoint) until a new forwarder listens
on the same port. In both,
moto's keys stay intact, so the recovery is real.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from awskms_moto import MotoKMS, aws_environment, moto_kms
from peers import LOOPBACK, free_port
from proxy_site import Site, serving
from test_awskms_proxy import (
    TLS13,
    anyio_backend,
    certify_kms_key,
    fetch_subject,
    nginx_for,
    site,
)

from kmsproxy import Proxy, Registry, SignatureScheme, SignerError
from kmsproxy.backoff import Backoff, BackoffPolicy
from kmsproxy_awskms import KMSSigner, service

__all__ = ["anyio_backend", "aws_environment", "moto_kms", "site"]

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Short limits so one failed Sign takes about 2 s instead of 24 s or more:
# two attempts of a 0.5 s read timeout plus botocore's jittered retry delay
# (at most 1 s before the second attempt).
TEST_READ_TIMEOUT_SECONDS = 0.5
TEST_MAX_ATTEMPTS = 2
# The backoff runs on a manual clock (`ManualClock`) that does not move during
# the outage, so the second request always meets the hold, however slow the
# machine. The test moves the clock past `maximum` before each recovery try.
TEST_RECONNECT_POLICY = BackoffPolicy("awskms-reconnect", initial=5.0, maximum=10.0)

# Requests through the proxy after moto resumes, before the test gives up.
# Each one finds the hold over; a try can still fail while moto's port comes
# back, so a few are allowed, RECOVERY_POLL_SECONDS apart.
RECOVERY_ATTEMPTS = 20
RECOVERY_POLL_SECONDS = 0.5

FORWARDER = Path(__file__).with_name("awskms_forwarder.py")

# The forwarder starts in well under a second; 10 s only guards a hang.
FORWARDER_READY_TIMEOUT_SECONDS = 10.0
FORWARDER_POLL_SECONDS = 0.02


def status_of(stdout: bytes) -> int:
    return int(stdout.rsplit(b"status=", 1)[1])


class Forwarder:
    """`awskms_forwarder.py` in front of moto, stopped and restarted by PID."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        """Start listening on `port`, the same one each time; wait (bounded)."""
        self.process = subprocess.Popen(
            [sys.executable, str(FORWARDER), str(self.port), str(self.target_port)],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + FORWARDER_READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the forwarder exited"
            with contextlib.suppress(OSError):
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return
            time.sleep(FORWARDER_POLL_SECONDS)
        self.stop()
        raise AssertionError(f"the forwarder did not listen on port {self.port}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait(timeout=FORWARDER_READY_TIMEOUT_SECONDS)


class ManualClock:
    """A monotonic clock for the backoff that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def pass_hold(self) -> None:
        self.now += TEST_RECONNECT_POLICY.maximum


@pytest.fixture
def short_limits(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    clock = ManualClock()
    monkeypatch.setattr(service, "READ_TIMEOUT_SECONDS", TEST_READ_TIMEOUT_SECONDS)
    monkeypatch.setattr(service, "MAX_ATTEMPTS", TEST_MAX_ATTEMPTS)
    monkeypatch.setattr(service, "RECONNECT_POLICY", TEST_RECONNECT_POLICY)
    monkeypatch.setattr(service, "Backoff", functools.partial(Backoff, clock=clock))
    monkeypatch.setattr(service, "_SERVICES", {})
    return clock


@dataclass
class OutageResult:
    """What curl got before, during and after the outage."""

    before: bytes
    first_failure: bytes
    held_back: bytes
    recovery_statuses: list[int]
    after: bytes


async def run_outage(
    site: Site,
    uri: str,
    cert: Path,
    stop: Callable[[], Awaitable[None]],
    restart: Callable[[], Awaitable[None]],
    clock: ManualClock,
) -> OutageResult:
    """Fetch through the proxy, stop KMS, fetch twice, restart it, and fetch
    until a request works (bounded by RECOVERY_ATTEMPTS)."""
    config = site.config(client_keys=[uri], client_certificates=[cert])
    with nginx_for(site, TLS13) as nginx:
        async with serving(Proxy(config)) as addresses:
            before = await fetch_subject(site, addresses, nginx)
            await stop()
            try:
                first_failure = await fetch_subject(site, addresses, nginx)
                held_back = await fetch_subject(site, addresses, nginx)
            finally:
                await restart()

            statuses = []
            for _ in range(RECOVERY_ATTEMPTS):
                clock.pass_hold()
                after = await fetch_subject(site, addresses, nginx)
                statuses.append(status_of(after.stdout))
                if statuses[-1] == 200:
                    break
                await anyio.sleep(RECOVERY_POLL_SECONDS)

    return OutageResult(
        before.stdout, first_failure.stdout, held_back.stdout, statuses, after.stdout
    )


def check_outage(
    result: OutageResult, cause: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    assert status_of(result.before) == 200
    assert status_of(result.first_failure) == 502
    assert b"KMS unreachable: " + cause in result.first_failure
    assert status_of(result.held_back) == 502
    assert b"retrying in 5.0 s (backoff awskms-reconnect)" in result.held_back
    assert result.recovery_statuses[-1] == 200
    assert result.after == b"subject=CN=kms outage\nstatus=200"
    transitions = [r.getMessage() for r in caplog.records]
    assert sum("store unavailable" in m for m in transitions) == 1
    assert sum("store available again" in m for m in transitions) == 1


async def test_paused_kms_is_502_then_recovers(
    site: Site,
    moto_kms: MotoKMS,
    short_limits: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """moto stops (SIGSTOP): connections open but no response comes."""
    caplog.set_level(logging.WARNING, logger="kmsproxy.backoff")
    key_id = moto_kms.create_key("ECC_NIST_P256")
    cert = certify_kms_key(site, moto_kms, key_id, "kms outage")

    async def pause() -> None:
        moto_kms.pause()

    async def resume() -> None:
        moto_kms.resume()

    result = await run_outage(
        site, moto_kms.uri(key_id), cert, pause, resume, short_limits
    )
    check_outage(result, b"Read timeout", caplog)


async def test_refused_kms_is_502_then_recovers(
    site: Site,
    moto_kms: MotoKMS,
    short_limits: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The endpoint goes away (connection refused) and comes back on the
    same port."""
    caplog.set_level(logging.WARNING, logger="kmsproxy.backoff")
    key_id = moto_kms.create_key("ECC_NIST_P256")
    cert = certify_kms_key(site, moto_kms, key_id, "kms outage")
    forwarder = Forwarder(moto_kms.port)
    uri = moto_kms.uri(key_id, endpoint=forwarder.endpoint)

    async def stop() -> None:
        forwarder.stop()

    async def restart() -> None:
        forwarder.start()

    forwarder.start()
    try:
        result = await run_outage(site, uri, cert, stop, restart, short_limits)
    finally:
        forwarder.stop()
    check_outage(result, b"Could not connect to the endpoint URL", caplog)


# Tunnels in flight when KMS stops responding, as a browser opens at once.
CONCURRENT_SIGNS = 10


async def test_requests_in_flight_are_one_outage(
    moto_kms: MotoKMS, short_limits: ManualClock
) -> None:
    """Every request that was already sent fails once KMS hangs; together
    they count as one failure, so the delay stays at `initial`."""
    key_id = moto_kms.create_key("ECC_NIST_P256")
    signer = Registry.load().open_signer(moto_kms.uri(key_id))
    assert isinstance(signer, KMSSigner)
    errors: list[str] = []

    async def sign_once() -> None:
        try:
            await signer.sign(b"in flight", SignatureScheme.ecdsa_secp256r1_sha256)
        except SignerError as error:
            errors.append(str(error))

    moto_kms.pause()
    try:
        async with anyio.create_task_group() as group:
            for _ in range(CONCURRENT_SIGNS):
                group.start_soon(sign_once)
    finally:
        moto_kms.resume()
    assert len(errors) == CONCURRENT_SIGNS
    assert signer.service.backoff.failures == 1
    assert signer.service.backoff.seconds_until_ready() == (
        TEST_RECONNECT_POLICY.initial
    )
