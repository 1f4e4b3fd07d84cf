"""The relay and the server TLS stream: half-close, idle timeout, errors."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSStream
from cryptography.hazmat.primitives import serialization
from pki import issue, make_ca

from kmsproxy.ca import server_context
from kmsproxy.proxy.tls_stream import ServerTLSStream
from kmsproxy.proxy.tunnel import relay

pytestmark = pytest.mark.anyio

# Upper bound for each exchange on loopback, which takes milliseconds.
STEP_TIMEOUT_SECONDS = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def tcp_pair() -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]:
    """Return both ends of one loopback TCP connection."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    async with listener:
        client = await anyio.connect_tcp("127.0.0.1", port)
        server = await listener.listeners[0].accept()  # type: ignore[attr-defined]
    return client, server


async def read_all(stream: anyio.abc.ByteStream) -> bytes:
    chunks = []
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        while True:
            try:
                chunks.append(await stream.receive())
            except anyio.EndOfStream:
                return b"".join(chunks)


async def test_half_close_crosses_relay() -> None:
    client, proxy_client_side = await tcp_pair()
    proxy_upstream_side, server = await tcp_pair()
    async with anyio.create_task_group() as group:
        group.start_soon(relay, proxy_client_side, proxy_upstream_side, 60.0)
        await client.send(b"request")
        await client.send_eof()
        assert await read_all(server) == b"request"
        # The client's direction is closed; the other still flows.
        await server.send(b"response after client EOF")
        await server.send_eof()
        assert await read_all(client) == b"response after client EOF"
    for stream in (client, server, proxy_client_side, proxy_upstream_side):
        await stream.aclose()


async def test_relay_returns_byte_counts() -> None:
    client, proxy_client_side = await tcp_pair()
    proxy_upstream_side, server = await tcp_pair()
    async with anyio.create_task_group() as group:

        async def run() -> None:
            counts.extend(await relay(proxy_client_side, proxy_upstream_side, 60.0))

        counts: list[int] = []
        group.start_soon(run)
        await client.send(b"12345")
        await client.send_eof()
        await read_all(server)
        await server.send(b"123")
        await server.send_eof()
        await read_all(client)
    assert counts == [5, 3]


async def test_idle_tunnel_closes() -> None:
    client, proxy_client_side = await tcp_pair()
    proxy_upstream_side, server = await tcp_pair()
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        await relay(proxy_client_side, proxy_upstream_side, 0.2)
    for stream in (client, server, proxy_client_side, proxy_upstream_side):
        await stream.aclose()


async def test_reset_ends_both_directions() -> None:
    client, proxy_client_side = await tcp_pair()
    proxy_upstream_side, server = await tcp_pair()
    async with anyio.create_task_group() as group:
        group.start_soon(relay, proxy_client_side, proxy_upstream_side, 60.0)
        await proxy_upstream_side.aclose()
    await client.aclose()
    await server.aclose()


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = make_ca()
    leaf = issue(ca, "server.test", dns_names=("server.test",))
    server = server_context(leaf.chain, leaf.key)
    client = ssl.create_default_context()
    pem = ca.cert.public_bytes(serialization.Encoding.PEM).decode()
    client.load_verify_locations(cadata=pem)
    return server, client


@pytest.fixture
async def tls_pair() -> AsyncIterator[tuple[anyio.abc.ByteStream, ServerTLSStream]]:
    server_ctx, client_ctx = contexts()
    client_tcp, server_tcp = await tcp_pair()
    async with anyio.create_task_group() as group:
        results: dict[str, anyio.abc.ByteStream] = {}

        async def accept() -> None:
            results["server"] = await ServerTLSStream.wrap(server_tcp, server_ctx)

        group.start_soon(accept)
        results["client"] = await TLSStream.wrap(
            client_tcp, hostname="server.test", ssl_context=client_ctx
        )
    server = results["server"]
    assert isinstance(server, ServerTLSStream)
    yield results["client"], server
    await server.aclose()
    await anyio.aclose_forcefully(results["client"])


async def test_tls_half_close_keeps_reading(
    tls_pair: tuple[anyio.abc.ByteStream, ServerTLSStream],
) -> None:
    client, server = tls_pair
    await server.send(b"last words")
    await server.send_eof()
    assert await read_all(client) == b"last words"
    await client.send(b"still talking")
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        assert await server.receive() == b"still talking"


async def test_tls_send_after_eof_fails(
    tls_pair: tuple[anyio.abc.ByteStream, ServerTLSStream],
) -> None:
    _, server = tls_pair
    await server.send_eof()
    with pytest.raises(anyio.ClosedResourceError):
        await server.send(b"too late")


async def test_tls_version_is_13(
    tls_pair: tuple[anyio.abc.ByteStream, ServerTLSStream],
) -> None:
    _, server = tls_pair
    assert server.version == "TLSv1.3"
