"""Session resumption through the proxy, and the counters on /metrics."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from anyio.streams.tls import TLSStream
from peers import (
    Peer,
    build_go_server,
    free_port,
    start_go_server,
    start_openssl_server,
)
from proxy_site import (
    REQUEST_TIMEOUT_SECONDS,
    Site,
    curl,
    nginx,
    proxy_address,
    renew,
    serving,
    site,
    wait_for_identity,
)

from kmsproxy import Proxy, ProxyAddresses
from kmsproxy.cli.demo import fetch_through_proxy
from kmsproxy.metrics import metrics
from kmsproxy.proxy.prometheus import METRICS_MEDIA_TYPE

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Fixtures shared through proxy_site.
__all__ = ["nginx", "site"]

# Sequential tunnels to one upstream in the resumption test.
TUNNEL_COUNT = 50

# Bound on receive() calls while reading the CONNECT response or the Go
# peer's reply. Each is under 1 KiB, so 100 reads is far more than needed.
MAX_READS = 100


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def s_server(site: Site) -> Iterator[Peer]:
    """`openssl s_server -www` (TLS 1.3, tickets on, client cert required)."""
    with start_openssl_server(
        site.directory,
        site.path("server.crt"),
        site.path("server.key"),
        site.path("client-ca.crt"),
    ) as peer:
        yield peer


@pytest.fixture
def go_server(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """The Go `crypto/tls` echo peer (TLS 1.3, tickets on, client cert
    required)."""
    binary = build_go_server(tmp_path_factory.mktemp("go-build"))
    with start_go_server(
        site.directory,
        binary,
        site.path("server.crt"),
        site.path("server.key"),
        site.path("client-ca.crt"),
    ) as peer:
        yield peer


@pytest.fixture
async def running(site: Site) -> AsyncIterator[tuple[Proxy, ProxyAddresses]]:
    proxy = Proxy(site.config(pac_listen="127.0.0.1:0"))
    async with serving(proxy) as addresses:
        yield proxy, addresses


async def fetch(addresses: ProxyAddresses, site: Site, port: int) -> bytes:
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        return await fetch_through_proxy(
            proxy_address(addresses), "localhost", port, site.path("ca.crt")
        )


async def echo_line(addresses: ProxyAddresses, site: Site, port: int) -> bytes:
    """CONNECT through the proxy to the Go peer, send one line, and return
    the peer's handshake line with the echoed line after it."""
    context = ssl.create_default_context(cafile=str(site.path("ca.crt")))
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        async with await anyio.connect_tcp(*proxy_address(addresses)) as stream:
            request = f"CONNECT localhost:{port} HTTP/1.1\r\n"
            request += f"Host: localhost:{port}\r\n\r\n"
            await stream.send(request.encode())
            head = b""
            for _ in range(MAX_READS):
                if b"\r\n\r\n" in head:
                    break
                head += await stream.receive()
            assert head.startswith(b"HTTP/1.1 200"), head
            tls = await TLSStream.wrap(
                stream,
                hostname="localhost",
                ssl_context=context,
                standard_compatible=False,
            )
            await tls.send(b"ping\n")
            reply = b""
            for _ in range(MAX_READS):
                if reply.count(b"\n") >= 2:
                    break
                reply += await tls.receive()
            return reply


async def wait_for_tunnels_closed(proxy: Proxy) -> None:
    """Wait (bounded) until the proxy has noticed that every client left."""
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        while proxy.counts().tunnels.open:
            await anyio.sleep(0.01)


async def test_fifty_tunnels_sign_once(
    site: Site, nginx: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    before = metrics.snapshot()
    bodies = [await fetch(addresses, site, nginx.port) for _ in range(TUNNEL_COUNT)]
    after = metrics.snapshot()
    assert bodies == [b"hello from nginx\n"] * TUNNEL_COUNT
    assert after.signer_calls - before.signer_calls == 1
    assert after.full_handshakes - before.full_handshakes == 1
    assert after.resumed_handshakes - before.resumed_handshakes == TUNNEL_COUNT - 1
    assert nginx.client_subjects() == ["CN=proxy client"] * TUNNEL_COUNT


async def test_fifty_tunnels_sign_once_s_server(
    site: Site, s_server: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    before = metrics.snapshot()
    bodies = [await fetch(addresses, site, s_server.port) for _ in range(TUNNEL_COUNT)]
    after = metrics.snapshot()
    # s_server -www reports each connection as "New, TLSv1.3, ..." or
    # "Reused, TLSv1.3, ..." in its status page.
    new = [body for body in bodies if b"New, TLSv1.3" in body]
    reused = [body for body in bodies if b"Reused, TLSv1.3" in body]
    assert len(new) == 1
    assert len(reused) == TUNNEL_COUNT - 1
    assert after.signer_calls - before.signer_calls == 1
    assert after.full_handshakes - before.full_handshakes == 1
    assert after.resumed_handshakes - before.resumed_handshakes == TUNNEL_COUNT - 1


async def test_fifty_tunnels_sign_once_go(
    site: Site, go_server: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    before = metrics.snapshot()
    replies = [
        await echo_line(addresses, site, go_server.port) for _ in range(TUNNEL_COUNT)
    ]
    after = metrics.snapshot()
    first_lines = [reply.split(b"\n", 1)[0] for reply in replies]
    echoed = [reply.split(b"\n", 1)[1] for reply in replies]
    assert echoed == [b"ping\n"] * TUNNEL_COUNT
    assert [b"resumed=false" in line for line in first_lines].count(True) == 1
    assert [b"resumed=true" in line for line in first_lines].count(True) == (
        TUNNEL_COUNT - 1
    )
    assert all(b"subject=CN=proxy client" in line for line in first_lines)
    assert after.signer_calls - before.signer_calls == 1
    assert after.full_handshakes - before.full_handshakes == 1
    assert after.resumed_handshakes - before.resumed_handshakes == TUNNEL_COUNT - 1


async def test_reload_forgets_sessions(
    site: Site, nginx: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    proxy, addresses = running
    await fetch(addresses, site, nginx.port)
    assert proxy.session_cache is not None
    assert len(proxy.session_cache) > 0
    renew(site, "renewed")
    await wait_for_identity(proxy, "CN=renewed")
    assert proxy.session_cache is not None
    assert len(proxy.session_cache) == 0
    before = metrics.snapshot()
    await fetch(addresses, site, nginx.port)
    after = metrics.snapshot()
    assert after.signer_calls - before.signer_calls == 1
    assert after.resumed_handshakes - before.resumed_handshakes == 0
    assert nginx.client_subjects() == ["CN=proxy client", "CN=renewed"]


async def test_metrics_page_counts_tunnels(
    site: Site, nginx: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    proxy, addresses = running
    await fetch(addresses, site, nginx.port)
    await wait_for_tunnels_closed(proxy)
    result = await curl(
        "--include", f"http://127.0.0.1:{addresses.pac[0].port}/metrics"
    )
    assert result.returncode == 0, result.stderr.decode()
    head, _, body = result.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200 OK")
    assert f"Content-Type: {METRICS_MEDIA_TYPE}" in head
    lines = body.splitlines()
    assert "# TYPE kmsproxy_signer_calls_total counter" in lines
    assert "kmsproxy_tunnels_total 1" in lines
    assert "kmsproxy_tunnels_open 0" in lines
    assert "kmsproxy_tunnels_failed_total 0" in lines
    assert 'kmsproxy_certificates_minted_total{purpose="upstream"} 1' in lines


async def test_metrics_page_counts_failures(
    site: Site, running: tuple[Proxy, ProxyAddresses]
) -> None:
    proxy, addresses = running
    closed_port = free_port()
    refused = await curl(
        "--proxy", addresses.proxy_url, f"https://localhost:{closed_port}/"
    )
    await wait_for_tunnels_closed(proxy)
    result = await curl(f"http://127.0.0.1:{addresses.pac[0].port}/metrics")
    lines = result.stdout.decode().splitlines()
    assert "kmsproxy_tunnels_total 1" in lines
    assert "kmsproxy_tunnels_failed_total 1" in lines
    assert b"CONNECT tunnel failed, response 502" in refused.stderr
