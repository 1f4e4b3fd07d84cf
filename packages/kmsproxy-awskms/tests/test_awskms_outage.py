"""KMS stops responding mid-run: the proxy returns 502, then recovers by itself.

moto is paused with SIGSTOP, so its port still accepts connections but
no request gets an answer (what a hung endpoint does), and then resumed
with SIGCONT with its keys intact.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
from awskms_moto import MotoKMS, aws_environment, moto_kms
from test_awskms_proxy import (
    TLS13,
    certify_kms_key,
    fetch_subject,
    nginx_for,
    serving,
)
from test_proxy import Site, make_site

from kmsproxy import Proxy
from kmsproxy.backoff import BackoffPolicy
from kmsproxy_awskms import service

__all__ = ["aws_environment", "moto_kms"]

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Short limits so one failed Sign takes about 2 s instead of up to 24 s:
# two attempts of a 0.5 s read timeout plus botocore's jittered retry delay
# (at most 1 s before the second attempt).
TEST_READ_TIMEOUT_SECONDS = 0.5
TEST_MAX_ATTEMPTS = 2
TEST_RECONNECT_POLICY = BackoffPolicy("awskms-reconnect", initial=0.5, maximum=1.0)

# Requests through the proxy after moto resumes, before the test gives up.
# The backoff lets an attempt through at most 1 s after the last failure,
# and the requests are RECOVERY_POLL_SECONDS apart, so 20 leave a margin.
RECOVERY_ATTEMPTS = 20
RECOVERY_POLL_SECONDS = 0.5


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


def status_of(stdout: bytes) -> int:
    return int(stdout.rsplit(b"status=", 1)[1])


async def test_outage_is_502_then_recovers(
    site: Site,
    moto_kms: MotoKMS,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(service, "READ_TIMEOUT_SECONDS", TEST_READ_TIMEOUT_SECONDS)
    monkeypatch.setattr(service, "MAX_ATTEMPTS", TEST_MAX_ATTEMPTS)
    monkeypatch.setattr(service, "RECONNECT_POLICY", TEST_RECONNECT_POLICY)
    monkeypatch.setattr(service, "_SERVICES", {})
    key_id = moto_kms.create_key("ECC_NIST_P256")
    cert = certify_kms_key(site, moto_kms, key_id, "kms outage")
    config = site.config(client_keys=[moto_kms.uri(key_id)], client_certificates=[cert])
    caplog.set_level(logging.WARNING, logger="kmsproxy.backoff")

    with nginx_for(site, TLS13, monkeypatch) as nginx:
        async with serving(Proxy(config)) as addresses:
            before = await fetch_subject(site, addresses, nginx)
            moto_kms.pause()
            try:
                timed_out = await fetch_subject(site, addresses, nginx)
                held_back = await fetch_subject(site, addresses, nginx)
            finally:
                moto_kms.resume()

            statuses = []
            for _ in range(RECOVERY_ATTEMPTS):
                after = await fetch_subject(site, addresses, nginx)
                statuses.append(status_of(after.stdout))
                if statuses[-1] == 200:
                    break
                await anyio.sleep(RECOVERY_POLL_SECONDS)

    assert status_of(before.stdout) == 200
    assert status_of(timed_out.stdout) == 502
    assert b"KMS unreachable: Read timeout" in timed_out.stdout
    assert status_of(held_back.stdout) == 502
    assert b"(backoff awskms-reconnect)" in held_back.stdout
    assert statuses[-1] == 200
    assert after.stdout == b"subject=CN=kms outage\nstatus=200"
    transitions = [r.getMessage() for r in caplog.records]
    assert sum("store unavailable" in m for m in transitions) == 1
    assert sum("store available again" in m for m in transitions) == 1
