"""Tunnel set-up: the client's TLS session with the proxy resumes.

A client that offers the session of its previous tunnel to the same
upstream resumes it with the proxy, so its second handshake skips the
certificate and signature. The client here is Python's blocking `ssl`
client in a worker thread, as the benchmark's latency client is.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator

import anyio
import pytest
from peers import Peer
from proxy_site import (
    REQUEST_TIMEOUT_SECONDS,
    Site,
    nginx,
    proxy_address,
    serving,
    site,
)

from kmsproxy import Proxy, ProxyAddresses

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Fixtures shared through proxy_site.
__all__ = ["nginx", "site"]

# Sequential tunnels in the resumption tests.
TUNNEL_COUNT = 5

# Maximum bytes of a CONNECT response head or of nginx's reply.
MAX_RESPONSE_BYTES = 64 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def running(site: Site) -> AsyncIterator[tuple[Proxy, ProxyAddresses]]:
    proxy = Proxy(site.config())
    async with serving(proxy) as addresses:
        yield proxy, addresses


def read_until(sock: socket.socket | ssl.SSLSocket, end: bytes) -> bytes:
    """Read until `end` is seen or the peer closes, within MAX_RESPONSE_BYTES."""
    data = b""
    while end not in data and len(data) < MAX_RESPONSE_BYTES:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def tunnel_get(
    proxy: tuple[str, int],
    upstream_port: int,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None,
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """GET / through one new tunnel, offering `session`.

    Return the response, the session to offer next, and whether the
    handshake with the proxy resumed.
    """
    with socket.create_connection(proxy, timeout=REQUEST_TIMEOUT_SECONDS) as raw:
        authority = f"localhost:{upstream_port}"
        raw.sendall(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        )
        head = read_until(raw, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        with context.wrap_socket(
            raw, server_hostname="localhost", session=session
        ) as sock:
            sock.sendall(
                b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            response = read_until(sock, b"\x00never")
            return response, sock.session, bool(sock.session_reused)


async def test_client_resumes_with_proxy(
    site: Site, nginx: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    context = ssl.create_default_context(cafile=str(site.path("ca.crt")))
    session: ssl.SSLSession | None = None
    reused: list[bool] = []
    for _ in range(TUNNEL_COUNT):
        with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
            response, session, resumed = await anyio.to_thread.run_sync(
                tunnel_get, proxy_address(addresses), nginx.port, context, session
            )
        assert response.endswith(b"hello from nginx\n"), response
        reused.append(resumed)
    assert reused == [False] + [True] * (TUNNEL_COUNT - 1)
