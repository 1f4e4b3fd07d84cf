"""The wait for a TLS 1.3 server to reject our client certificate.

After a full TLS 1.3 handshake the server checks our certificate only once
its own Finished is sent, so a rejection comes as an alert afterwards. The
stream's `client_certificate_pending` is True while that can still happen,
and `receive_after_handshake` returns as soon as the server sends anything.
The proxy waits for that within bounds, and a rejection after the wait
still reaches an HTTP/1.1 client as a 502 page.
"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path
from typing import Any

import anyio
import pytest
from peers import LOOPBACK, Peer, PythonPeer, serve_python_tls, start_openssl_server
from pki import make_ca
from proxy_site import Site, curl, nginx, running, site

from kmsproxy import Proxy, ProxyAddresses
from kmsproxy.proxy import tunnel
from kmsproxy.signer import SoftwareSigner
from kmsproxy.tls import (
    AlertDescription,
    AlertReceived,
    ClientIdentity,
    TLSClientConfig,
    TLSClientStream,
    TrustStore,
    connect_tls,
)

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

__all__ = ["nginx", "running", "site"]

# Bounds a wait for a loopback peer, which replies within milliseconds.
PEER_REPLY_TIMEOUT_SECONDS = 10.0

# How long a silent server is watched to show that nothing ends the wait.
SILENCE_SECONDS = 0.2

# A rejection wait far longer than any request below may take: a request
# that completes shows that something other than the bound ended the wait.
LONG_WAIT_SECONDS = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client_config(site: Site) -> TLSClientConfig:
    signer = SoftwareSigner(site.client.key, "file:client.key")
    return TLSClientConfig(
        "localhost",
        [ClientIdentity(tuple(site.client.chain), signer)],
        TrustStore.load([site.path("upstream-ca.crt")], include_system=False),
    )


async def open_stream(site: Site, port: int) -> TLSClientStream:
    transport = await anyio.connect_tcp(LOOPBACK, port)
    try:
        with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
            return await connect_tls(transport, client_config(site))
    except BaseException:
        await transport.aclose()
        raise


def python_server(
    site: Site, client_ca: Path | None, **options: Any
) -> contextlib.AbstractAsyncContextManager[PythonPeer]:
    """Serve Python's `ssl` echo server with the site's upstream leaf."""
    return serve_python_tls(
        site.path("server.crt"), site.path("server.key"), client_ca, **options
    )


async def fetch_through(addresses: ProxyAddresses, site: Site, url: str) -> bytes:
    """Fetch `url` with curl through the proxy; return the body and status."""
    result = await curl(
        "--proxy",
        addresses.proxy_url,
        "--cacert",
        str(site.path("ca.crt")),
        "--write-out",
        "status=%{http_code}",
        url,
    )
    return result.stdout


async def test_ticket_confirms_certificate(site: Site) -> None:
    async with python_server(site, site.path("client-ca.crt")) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            pending_after_handshake = stream.client_certificate_pending
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                data = await stream.receive_after_handshake()
            pending_after_ticket = stream.client_certificate_pending
    assert pending_after_handshake
    assert data == b""
    assert not pending_after_ticket


async def test_silent_server_keeps_certificate_pending(site: Site) -> None:
    async with python_server(site, site.path("client-ca.crt"), num_tickets=0) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            with anyio.move_on_after(SILENCE_SECONDS) as silence:
                await stream.receive_after_handshake()
            pending_while_silent = stream.client_certificate_pending
            await stream.send(b"ping")
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                echoed = await stream.receive_after_handshake()
            pending_after_data = stream.client_certificate_pending
    assert silence.cancelled_caught
    assert pending_while_silent
    assert echoed == b"ping"
    assert not pending_after_data


async def test_no_certificate_request_is_not_pending(site: Site) -> None:
    async with python_server(site, None, num_tickets=0) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            pending = stream.client_certificate_pending
    assert not pending


async def test_tls12_is_not_pending(site: Site) -> None:
    async with python_server(
        site, site.path("client-ca.crt"), maximum_version=ssl.TLSVersion.TLSv1_2
    ) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            version = stream.version
            pending = stream.client_certificate_pending
    assert version == "TLSv1.2"
    assert not pending


async def test_rejection_raises_after_handshake(site: Site) -> None:
    other_ca = site.path("other-ca.crt")
    other_ca.write_bytes(make_ca("other client CA").chain_pem())
    with start_openssl_server(
        site.directory,
        site.path("server.crt"),
        site.path("server.key"),
        other_ca,
        extra_args=["-verify_return_error"],
    ) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            with (
                anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS),
                pytest.raises(AlertReceived) as caught,
            ):
                await stream.receive_after_handshake()
    assert caught.value.description == AlertDescription.unknown_ca


def fix_rejection_wait(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    monkeypatch.setattr(tunnel, "REJECTION_WAIT_MIN_SECONDS", seconds)
    monkeypatch.setattr(tunnel, "REJECTION_WAIT_MAX_SECONDS", seconds)


async def test_proxy_wait_ends_at_ticket(
    site: Site,
    nginx: Peer,
    running: tuple[Proxy, ProxyAddresses],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # nginx requests a client certificate and sends session tickets.
    fix_rejection_wait(monkeypatch, LONG_WAIT_SECONDS)
    _, addresses = running
    with anyio.fail_after(LONG_WAIT_SECONDS / 2):
        output = await fetch_through(
            addresses, site, f"https://localhost:{nginx.port}/subject"
        )
    assert output.endswith(b"status=200")


async def test_late_rejection_is_502_page(
    site: Site,
    running: tuple[Proxy, ProxyAddresses],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No wait at all: the alert reaches the proxy only while it relays.
    fix_rejection_wait(monkeypatch, 0.0)
    proxy, addresses = running
    other_ca = site.path("other-ca.crt")
    other_ca.write_bytes(make_ca("other client CA").chain_pem())
    with start_openssl_server(
        site.directory,
        site.path("server.crt"),
        site.path("server.key"),
        other_ca,
        extra_args=["-verify_return_error", "-no_ticket"],
    ) as peer:
        output = await fetch_through(addresses, site, f"https://localhost:{peer.port}/")
    assert b"server rejected our certificate" in output
    assert b"unknown_ca" in output
    assert output.endswith(b"status=502")
    # The page came through the relay, under the upstream's minted leaf.
    assert proxy.minter is not None
    assert proxy.minter.mint_count == 1
