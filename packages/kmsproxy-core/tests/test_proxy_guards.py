"""Guards in front of the tunnel: loops, stalled TLS, exposed listeners."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from test_proxy import Site, exchange, make_site, status_of

from kmsproxy import Proxy, ProxyAddresses
from kmsproxy.proxy.listener import ListenAddress
from kmsproxy.proxy.server import warn_if_exposed

# A head timeout short enough for a test, far above a loopback round trip.
SHORT_HEAD_TIMEOUT_SECONDS = 0.5


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


@pytest.fixture
async def running(site: Site) -> AsyncIterator[ProxyAddresses]:
    proxy = Proxy(site.config(pac_listen="127.0.0.1:0"))
    async with anyio.create_task_group() as group:
        yield await group.start(proxy.serve)
        group.cancel_scope.cancel()


def address_of(addresses: ProxyAddresses) -> tuple[str, int]:
    return addresses.proxy[0].host, addresses.proxy[0].port


@pytest.mark.anyio
async def test_connect_to_self_is_508(running: ProxyAddresses) -> None:
    port = running.proxy[0].port
    response = await exchange(
        address_of(running), f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode()
    )
    assert status_of(response) == 508
    assert b"own listening address" in response


@pytest.mark.anyio
async def test_connect_to_mapped_self_is_508(running: ProxyAddresses) -> None:
    # The IPv6 socket reaches the IPv4 listener through the mapped address.
    port = running.proxy[0].port
    response = await exchange(
        address_of(running),
        f"CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\n\r\n".encode(),
    )
    assert status_of(response) == 508


@pytest.mark.anyio
async def test_connect_to_pac_port_is_508(running: ProxyAddresses) -> None:
    port = running.pac[0].port
    response = await exchange(
        address_of(running), f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode()
    )
    assert status_of(response) == 508


@pytest.mark.anyio
async def test_stalled_tls_gets_no_408(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "kmsproxy.proxy.server.HEAD_TIMEOUT_SECONDS", SHORT_HEAD_TIMEOUT_SECONDS
    )
    async with anyio.create_task_group() as group:
        addresses = await group.start(Proxy(site.config()).serve)
        # One byte of a TLS handshake record header, then nothing.
        response = await exchange(address_of(addresses), b"\x16")
        group.cancel_scope.cancel()
    assert response == b""


@pytest.mark.anyio
async def test_stalled_plain_head_still_408(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "kmsproxy.proxy.server.HEAD_TIMEOUT_SECONDS", SHORT_HEAD_TIMEOUT_SECONDS
    )
    async with anyio.create_task_group() as group:
        addresses = await group.start(Proxy(site.config()).serve)
        response = await exchange(address_of(addresses), b"CONNECT a.test:4")
        group.cancel_scope.cancel()
    assert status_of(response) == 408


def test_wildcard_listen_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    # No socket is bound: the check reads the addresses only.
    warn_if_exposed(ProxyAddresses((ListenAddress("0.0.0.0", 8090),)))  # noqa: S104
    assert "address=0.0.0.0:8090" in caplog.text
    assert "anyone who can reach it" in caplog.text


@pytest.mark.anyio
async def test_loopback_listen_is_quiet(
    running: ProxyAddresses, caplog: pytest.LogCaptureFixture
) -> None:
    assert "non-loopback" not in caplog.text


@pytest.mark.anyio
async def test_pac_file_and_requests_logged(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pac = site.path("proxy.pac")
    pac.write_text("function FindProxyForURL(u, h) { return 'DIRECT'; }\n")
    proxy = Proxy(site.config(pac_listen="127.0.0.1:0", pac_file=pac))
    async with anyio.create_task_group() as group:
        addresses = await group.start(proxy.serve)
        pac_address = (addresses.pac[0].host, addresses.pac[0].port)
        response = await exchange(pac_address, b"GET /proxy.pac HTTP/1.1\r\n\r\n")
        group.cancel_scope.cancel()
    assert status_of(response) == 200
    assert f"file={pac}" in caplog.text
    assert "PAC request method=GET target='/proxy.pac' status=200" in caplog.text
