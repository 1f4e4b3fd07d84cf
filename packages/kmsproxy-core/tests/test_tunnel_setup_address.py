"""Tunnel set-up: the upstream connect reuses the address a name last reached."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from kmsproxy.proxy.upstream_address import AddressCache, connect_tcp

pytestmark = pytest.mark.anyio

# Upper bound for one loopback connect in these tests.
CONNECT_TIMEOUT_SECONDS = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 only; connections are never accepted."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def remote_of(stream: anyio.abc.SocketStream) -> object:
    return stream.extra(SocketAttribute.remote_address)  # noqa: S610


def spy_on_connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the host of every `anyio.connect_tcp` call from now on."""
    hosts: list[str] = []
    real_connect = anyio.connect_tcp

    async def connect(host: str, port: int) -> anyio.abc.SocketStream:
        hosts.append(host)
        return await real_connect(host, port)

    monkeypatch.setattr(anyio, "connect_tcp", connect)
    return hosts


def test_cache_returns_stored_address() -> None:
    cache = AddressCache(clock=FakeClock())
    cache.put("a.test", 443, "192.0.2.1")
    assert cache.get("a.test", 443) == "192.0.2.1"
    assert cache.get("a.test", 8443) is None
    assert cache.get("b.test", 443) is None


def test_cache_entry_expires() -> None:
    clock = FakeClock()
    cache = AddressCache(lifetime=10.0, clock=clock)
    cache.put("a.test", 443, "192.0.2.1")
    clock.now = 9.9
    assert cache.get("a.test", 443) == "192.0.2.1"
    clock.now = 10.0
    assert cache.get("a.test", 443) is None
    assert len(cache) == 0


def test_cache_evicts_least_recent() -> None:
    cache = AddressCache(max_entries=2, clock=FakeClock())
    cache.put("a.test", 443, "192.0.2.1")
    cache.put("b.test", 443, "192.0.2.2")
    assert cache.get("a.test", 443) == "192.0.2.1"
    cache.put("c.test", 443, "192.0.2.3")
    assert cache.get("b.test", 443) is None
    assert cache.get("a.test", 443) == "192.0.2.1"
    assert cache.get("c.test", 443) == "192.0.2.3"


def test_cache_discard_and_clear() -> None:
    cache = AddressCache(clock=FakeClock())
    cache.put("a.test", 443, "192.0.2.1")
    cache.put("b.test", 443, "192.0.2.2")
    cache.discard("a.test", 443)
    cache.discard("missing.test", 443)
    assert cache.get("a.test", 443) is None
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0


async def test_connect_stores_address(listener: socket.socket) -> None:
    cache = AddressCache()
    port = port_of(listener)
    with anyio.fail_after(CONNECT_TIMEOUT_SECONDS):
        stream = await connect_tcp("localhost", port, cache)
    async with stream:
        remote = remote_of(stream)
    assert remote == ("127.0.0.1", port)
    assert cache.get("localhost", port) == "127.0.0.1"


async def test_connect_uses_cached_address(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = spy_on_connects(monkeypatch)
    cache = AddressCache()
    port = port_of(listener)
    cache.put("localhost", port, "127.0.0.1")
    with anyio.fail_after(CONNECT_TIMEOUT_SECONDS):
        stream = await connect_tcp("localhost", port, cache)
    await stream.aclose()
    assert hosts == ["127.0.0.1"]


async def test_connect_resolves_after_stale(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listener is IPv4 only, so the cached ::1 is refused (or, without
    # IPv6, unreachable), and the name is resolved again.
    hosts = spy_on_connects(monkeypatch)
    cache = AddressCache()
    port = port_of(listener)
    cache.put("localhost", port, "::1")
    with anyio.fail_after(CONNECT_TIMEOUT_SECONDS):
        stream = await connect_tcp("localhost", port, cache)
    async with stream:
        remote = remote_of(stream)
    assert remote == ("127.0.0.1", port)
    assert hosts == ["::1", "localhost"]
    assert cache.get("localhost", port) == "127.0.0.1"


async def test_connect_ip_address_not_cached(listener: socket.socket) -> None:
    cache = AddressCache()
    port = port_of(listener)
    with anyio.fail_after(CONNECT_TIMEOUT_SECONDS):
        stream = await connect_tcp("127.0.0.1", port, cache)
    await stream.aclose()
    assert len(cache) == 0


async def test_connect_without_cache(listener: socket.socket) -> None:
    port = port_of(listener)
    with anyio.fail_after(CONNECT_TIMEOUT_SECONDS):
        stream = await connect_tcp("localhost", port)
    async with stream:
        remote = remote_of(stream)
    assert remote == ("127.0.0.1", port)
