"""A device whose signature never returns: timeouts fire, the proxy stops.

`BlockingSigner` runs device calls in worker threads. A cancelled caller
abandons its thread, and the device lock that the thread still holds keeps a
second call off the device until the first one returns.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest
from peers import Peer
from pki import generate_key
from proxy_site import Site, curl, nginx, site
from test_proxy import anyio_backend

from kmsproxy import Proxy, identity, tls
from kmsproxy import signer as signer_module
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import (
    BlockingSigner,
    PrivateKey,
    PublicKey,
    SignatureScheme,
    Signer,
    SignerError,
    SoftwareSigner,
    schemes_for_public_key,
    sign_with_private_key,
)
from kmsproxy.uri import KeyURI

__all__ = ["anyio_backend", "nginx", "site"]

pytestmark = pytest.mark.anyio

# Upper bound for a hung signature to wait for its release. Each test releases
# the device long before, so this only bounds a broken test.
RELEASE_TIMEOUT_SECONDS = 60.0

# The signature timeout the proxy test gives the TLS client, so that the 502
# arrives in about a second instead of the default 20 s.
SHORT_SIGNATURE_TIMEOUT_SECONDS = 1.0

# Bound for the caller to return after cancellation or for the proxy to stop.
# Both take milliseconds; the bound is far below the hung call's wait.
PROMPT_SECONDS = 5.0


class HungDevice(BlockingSigner):
    """A software key behind a device that signs only once `release` is set."""

    def __init__(self, private_key: PrivateKey, tokens: float = 1) -> None:
        super().__init__(anyio.CapacityLimiter(tokens))
        self._private_key = private_key
        self._uri = "fake:name=hung"
        self.release = threading.Event()
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self._count_lock = threading.Lock()

    @property
    def uri(self) -> str:
        return self._uri

    def public_key(self) -> PublicKey:
        return self._private_key.public_key()

    @property
    def schemes(self) -> Sequence[SignatureScheme]:
        return schemes_for_public_key(self._private_key.public_key())

    def sign_blocking(self, data: bytes, scheme: SignatureScheme) -> bytes:
        with self._count_lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.release.wait(RELEASE_TIMEOUT_SECONDS)
            return sign_with_private_key(self._private_key, data, scheme)
        finally:
            with self._count_lock:
                self.active -= 1


@pytest.fixture
def device() -> Iterator[HungDevice]:
    hung = HungDevice(generate_key("p256"))
    yield hung
    hung.release.set()


async def test_cancel_abandons_hung_call(device: HungDevice) -> None:
    started = time.monotonic()
    with anyio.move_on_after(0.2) as scope:
        await device.sign(b"data", SignatureScheme.ecdsa_secp256r1_sha256)
    assert scope.cancelled_caught
    assert time.monotonic() - started < PROMPT_SECONDS


async def test_abandoned_call_keeps_device(
    device: HungDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(signer_module, "ABANDONED_CALL_WAIT_SECONDS", 0.2)
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    with anyio.move_on_after(0.2):
        await device.sign(b"first", scheme)
    with pytest.raises(SignerError, match="still busy with a call that timed out"):
        await device.sign(b"second", scheme)
    assert device.calls == 1
    device.release.set()
    with anyio.fail_after(PROMPT_SECONDS):
        signature = await _sign_once_free(device, b"third", scheme)
    assert signature.startswith(b"\x30")
    assert device.max_active == 1


async def _sign_once_free(
    device: HungDevice, data: bytes, scheme: SignatureScheme
) -> bytes:
    """Sign, retrying while an abandoned call still holds the device slot.

    The caller bounds the time.
    """
    while True:
        try:
            return await device.sign(data, scheme)
        except SignerError:
            await anyio.sleep(0.01)


async def test_device_slots_follow_limiter() -> None:
    """A store that takes several requests at once (a cloud KMS) keeps them."""
    device = HungDevice(generate_key("p256"), tokens=3)
    try:
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(
                    device.sign, b"data", SignatureScheme.ecdsa_secp256r1_sha256
                )
            with anyio.fail_after(PROMPT_SECONDS):
                while device.calls < 3:
                    await anyio.sleep(0.01)
            device.release.set()
    finally:
        device.release.set()
    assert device.max_active == 3


async def test_cancelled_waiters_skip_device() -> None:
    """Calls cancelled while waiting for the device never reach it.

    With two slots, one held by an abandoned call and one by a live call, a
    new call waits in its worker thread for a slot.
    """
    device = HungDevice(generate_key("p256"), tokens=2)
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    try:
        with anyio.move_on_after(0.1):
            await device.sign(b"abandoned", scheme)
        async with anyio.create_task_group() as group:
            group.start_soon(device.sign, b"live", scheme)
            with anyio.fail_after(PROMPT_SECONDS):
                while device.calls < 2:
                    await anyio.sleep(0.01)
            for index in range(4):
                with anyio.move_on_after(0.1) as scope:
                    await device.sign(b"waiter %d" % index, scheme)
                assert scope.cancelled_caught
            device.release.set()
        with anyio.fail_after(PROMPT_SECONDS):
            signature = await device.sign(b"after", scheme)
        # Give a waiter that wrongly goes on to the device the time to reach it.
        await anyio.sleep(0.5)
    finally:
        device.release.set()
    assert signature.startswith(b"\x30")
    assert device.calls == 3


async def test_abandoned_device_fails_fast(device: HungDevice) -> None:
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    with anyio.move_on_after(0.1):
        await device.sign(b"abandoned", scheme)
    started = time.monotonic()
    for index in range(3):
        with pytest.raises(SignerError, match="still busy with a call that timed out"):
            await device.sign(b"next %d" % index, scheme)
    assert time.monotonic() - started < PROMPT_SECONDS
    assert device.calls == 1


async def test_infinite_limiter_signs() -> None:
    device = HungDevice(generate_key("p256"), tokens=math.inf)
    device.release.set()
    signature = await device.sign(b"data", SignatureScheme.ecdsa_secp256r1_sha256)
    assert signature.startswith(b"\x30")


async def test_device_slots_follow_resize() -> None:
    device = HungDevice(generate_key("p256"))
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    device.release.set()
    await device.sign(b"first", scheme)
    device.release.clear()
    device.limiter.total_tokens = 2
    try:
        async with anyio.create_task_group() as group:
            for _ in range(2):
                group.start_soon(device.sign, b"data", scheme)
            with anyio.fail_after(PROMPT_SECONDS):
                while device.active < 2:
                    await anyio.sleep(0.01)
            device.release.set()
    finally:
        device.release.set()
    assert device.max_active == 2


@dataclasses.dataclass
class ShortSignatureConfig(tls.TLSClientConfig):
    signature_timeout: float = SHORT_SIGNATURE_TIMEOUT_SECONDS


async def test_hung_client_key_gets_502(
    site: Site, nginx: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "TLSClientConfig", ShortSignatureConfig)
    device = HungDevice(site.client.key)
    proxy = Proxy(site.config(client_keys=[device]))
    try:
        async with anyio.create_task_group() as group:
            addresses = await group.start(proxy.serve)
            started = time.monotonic()
            result = await curl(
                "--proxy", addresses.proxy_url,
                "--cacert", str(site.path("ca.crt")),
                "--write-out", "\nstatus=%{http_code}",
                f"https://127.0.0.1:{nginx.port}/subject",
            )  # fmt: skip
            answered = time.monotonic() - started
            stop_started = time.monotonic()
            group.cancel_scope.cancel()
        stopped = time.monotonic() - stop_started
    finally:
        device.release.set()
    assert result.stdout.endswith(b"status=502")
    assert answered < SHORT_SIGNATURE_TIMEOUT_SECONDS + PROMPT_SECONDS
    assert stopped < PROMPT_SECONDS
    assert device.calls == 1


# A `kmsproxy csr` run whose key never signs: a plugin with a hung device,
# and a CSR timeout short enough for a test.
HUNG_CSR_SCRIPT = """
import sys, threading, types
import anyio
from cryptography.hazmat.primitives.asymmetric import ec
from kmsproxy.cli import csr, run
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import BlockingSigner, schemes_for_public_key

class Hung(BlockingSigner):
    def __init__(self):
        super().__init__(anyio.CapacityLimiter(1))
        self.key = ec.generate_private_key(ec.SECP256R1())
    uri = "hung:name=k"
    def public_key(self):
        return self.key.public_key()
    @property
    def schemes(self):
        return schemes_for_public_key(self.key.public_key())
    def sign_blocking(self, data, scheme):
        threading.Event().wait(HANG_SECONDS)
        raise RuntimeError("the hung call returned")

module = types.ModuleType("hung")
module.kmsproxy_schemes = hookimpl(lambda: ["hung"])
module.kmsproxy_open_signer = hookimpl(lambda uri: Hung())
load = Registry.load.__func__
Registry.load = classmethod(
    lambda cls, plugins=(), **options: load(cls, [module, *plugins], **options)
)
csr.CSR_SIGN_TIMEOUT_SECONDS = 0.5
sys.argv = ["kmsproxy", "csr", "hung:name=k", "--subject", "CN=x"]
run()
"""

# How long the hung call blocks; the process must exit long before.
HANG_SECONDS = 60


def run_script(
    script: Path, text: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `text` as a Python script; return its result and seconds taken."""
    script.write_text(f"HANG_SECONDS = {HANG_SECONDS}\n{text}")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS - 10,
        check=False,
    )
    return result, time.monotonic() - started


def test_cli_exits_past_hung_call(tmp_path: Path) -> None:
    result, elapsed = run_script(tmp_path / "hung_csr.py", HUNG_CSR_SCRIPT)
    assert result.returncode == 2, result.stderr
    assert "the key did not sign within 0.5 s" in result.stderr
    assert "Exiting without waiting for device calls" in result.stderr
    assert elapsed < HANG_SECONDS / 2


# A bug that raises after a device call was abandoned: `run` must still exit
# without waiting for the hung call, after printing the traceback.
BUGGY_MAIN_SCRIPT = """
import anyio
import kmsproxy.cli
from kmsproxy.signer import SignatureScheme

async def abandon_call():
    with anyio.move_on_after(0.2):
        await Hung().sign(b"data", SignatureScheme.ecdsa_secp256r1_sha256)

def buggy_main():
    anyio.run(abandon_call)
    raise ValueError("a bug after the abandoned call")

kmsproxy.cli.main = buggy_main
kmsproxy.cli.run()
"""


def test_cli_exits_past_bug(tmp_path: Path) -> None:
    hung_class = HUNG_CSR_SCRIPT.split("module = types.ModuleType")[0]
    result, elapsed = run_script(
        tmp_path / "buggy_main.py", hung_class + BUGGY_MAIN_SCRIPT
    )
    assert result.returncode == 1, result.stderr
    assert "ValueError: a bug after the abandoned call" in result.stderr
    assert "Exiting without waiting for device calls" in result.stderr
    assert elapsed < HANG_SECONDS / 2


class LateSigner(SoftwareSigner):
    """A software key whose `aclose` is recorded."""

    def __init__(self, private_key: PrivateKey) -> None:
        super().__init__(private_key, "hungopen:name=k")
        self.closed = threading.Event()

    async def aclose(self) -> None:
        self.closed.set()


def hung_open_backend(
    key: PrivateKey, entered: threading.Event, release: threading.Event
) -> tuple[types.ModuleType, list[LateSigner]]:
    """A backend whose open hook blocks until `release`, and its signers."""
    opened: list[LateSigner] = []
    module = types.ModuleType("hung_open")

    @hookimpl
    def kmsproxy_schemes() -> list[str]:
        return ["hungopen"]

    @hookimpl
    def kmsproxy_open_signer(uri: KeyURI) -> Signer:
        entered.set()
        release.wait(RELEASE_TIMEOUT_SECONDS)
        opened.append(LateSigner(key))
        return opened[-1]

    module.kmsproxy_schemes = kmsproxy_schemes  # type: ignore[attr-defined]
    module.kmsproxy_open_signer = kmsproxy_open_signer  # type: ignore[attr-defined]
    return module, opened


async def test_stop_during_hung_open(site: Site) -> None:
    entered = threading.Event()
    release = threading.Event()
    module, opened = hung_open_backend(site.client.key, entered, release)
    config = site.config(client_keys=["hungopen:name=k"], plugins=[module])
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(Proxy(config).serve)
            with anyio.fail_after(PROMPT_SECONDS):
                while not entered.is_set():
                    await anyio.sleep(0.01)
            stop_started = time.monotonic()
            group.cancel_scope.cancel()
        stopped = time.monotonic() - stop_started
        release.set()
        with anyio.fail_after(PROMPT_SECONDS):
            while not (opened and opened[0].closed.is_set()):
                await anyio.sleep(0.01)
    finally:
        release.set()
    assert stopped < PROMPT_SECONDS
    assert opened[0].closed.is_set()


async def test_key_open_times_out(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "KEY_OPEN_TIMEOUT_SECONDS", 0.2)
    entered = threading.Event()
    release = threading.Event()
    module, opened = hung_open_backend(site.client.key, entered, release)
    registry = Registry.load([module])
    try:
        with anyio.fail_after(PROMPT_SECONDS):
            with pytest.raises(SignerError, match="opening the key timed out"):
                await identity.IdentityStore.open(registry, ["hungopen:name=k"], [])
        release.set()
        with anyio.fail_after(PROMPT_SECONDS):
            while not (opened and opened[0].closed.is_set()):
                await anyio.sleep(0.01)
    finally:
        release.set()
    assert opened[0].closed.is_set()
