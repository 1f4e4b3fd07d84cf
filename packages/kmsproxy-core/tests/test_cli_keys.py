"""Key arguments of `kmsproxy csr` and `kmsproxy init --key`.

A backend whose open hook blocks plays a hung device. The commands must
give up after `KEY_OPEN_TIMEOUT_SECONDS` with one line naming the key,
and never print the key's secret.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from pki import generate_key

from kmsproxy.cli import keys
from kmsproxy.cli.csr import create_request, parse_subject
from kmsproxy.cli.init import create_certificate_for_key, serve_command
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import Signer, SignerError, SoftwareSigner
from kmsproxy.uri import KeyURI

HUNG_SCHEME = "hung"
HUNG_KEY = f"{HUNG_SCHEME}:name=k;pin-value=secret-4711"

# Open time limit in these tests, instead of the 60 s default.
TEST_OPEN_TIMEOUT_SECONDS = 0.5

# Bound for the blocked hook: the test releases it after the command gave
# up, so only a test that failed waits this long.
HOOK_RELEASE_TIMEOUT_SECONDS = 10.0

# The command must give up well before the hook's own bound.
MAX_ELAPSED_SECONDS = 5.0


class HungBackend:
    """A backend whose open hook blocks until `release` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.key = generate_key("p256")

    @hookimpl
    def kmsproxy_schemes(self) -> list[str]:
        return [HUNG_SCHEME]

    @hookimpl
    def kmsproxy_open_signer(self, uri: KeyURI) -> Signer | None:
        if uri.scheme != HUNG_SCHEME:
            return None
        self.entered.set()
        self.release.wait(HOOK_RELEASE_TIMEOUT_SECONDS)
        return SoftwareSigner(self.key, uri.redacted())


@pytest.fixture
def hung_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[HungBackend]:
    monkeypatch.setattr(keys, "KEY_OPEN_TIMEOUT_SECONDS", TEST_OPEN_TIMEOUT_SECONDS)
    backend = HungBackend()
    try:
        yield backend
    finally:
        backend.release.set()


def check_timeout(error: SignerError, backend: HungBackend, elapsed: float) -> None:
    message = str(error)
    assert backend.entered.is_set()
    assert elapsed < MAX_ELAPSED_SECONDS
    assert message.startswith(f"{HUNG_SCHEME}:name=k;pin-value=***: ")
    assert f"timed out after {TEST_OPEN_TIMEOUT_SECONDS:g} s" in message
    assert "secret-4711" not in message
    assert "\n" not in message


def test_csr_open_times_out(hung_backend: HungBackend) -> None:
    registry = Registry.load([hung_backend], entry_points=False)
    subject = parse_subject("CN=hung")
    started = time.monotonic()
    with pytest.raises(SignerError) as raised:
        anyio.run(create_request, registry, HUNG_KEY, subject, [])
    check_timeout(raised.value, hung_backend, time.monotonic() - started)


def test_init_key_open_times_out(hung_backend: HungBackend) -> None:
    registry = Registry.load([hung_backend], entry_points=False)
    started = time.monotonic()
    with pytest.raises(SignerError) as raised:
        anyio.run(create_certificate_for_key, registry, HUNG_KEY, "CA")
    check_timeout(raised.value, hung_backend, time.monotonic() - started)


def test_open_within_limit_works(hung_backend: HungBackend) -> None:
    registry = Registry.load([hung_backend], entry_points=False)
    hung_backend.release.set()
    signer = anyio.run(keys.open_signer_within, registry, HUNG_KEY)
    assert signer.uri == f"{HUNG_SCHEME}:name=k;pin-value=***"


UNPARSABLE_KEYS = [
    pytest.param("file:path=a;pin-value=s3cret;pin-value=t", id="repeated"),
    pytest.param("file:=x;pin-value=s3cret", id="no-name"),
    pytest.param("file:pin-value", id="no-value"),
]


@pytest.mark.parametrize("key", UNPARSABLE_KEYS)
def test_shown_key_unparsable_hides_text(key: str) -> None:
    shown = keys.shown_key(key)
    assert "s3cret" not in shown
    assert "pin-value" not in shown
    assert shown == f"file:{keys.UNPARSED_URI_PLACEHOLDER}"


def test_serve_command_unparsable_hides_text() -> None:
    command = serve_command("file:=x;pin-value=s3cret", Path("ca.crt"))
    assert "s3cret" not in command
