"""Back-pressure through the relay: a reader that stops reading stops the
writer on the other side after a bounded number of bytes, in both
directions, and every byte still arrives in order once it reads again."""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSStream
from backpressure import (
    SMALL_RECEIVE_BUFFER_BYTES,
    TRANSFER_BYTES,
    TRANSFER_TIMEOUT_SECONDS,
    stall_then_read,
)
from test_proxy_relay import contexts, tcp_pair

from kmsproxy.proxy.tls_stream import ServerTLSStream
from kmsproxy.proxy.tunnel import relay

pytestmark = pytest.mark.anyio

# Bytes per send of the writer.
WRITE_BYTES = 2**18

# One pattern, so bytes delivered twice or out of order change the result.
PATTERN = bytes(itertools.islice(itertools.cycle(range(253)), WRITE_BYTES))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Tunnel:
    """The two ends of a tunnel without upstream TLS: a TLS client of the
    proxy's ServerTLSStream, and a plain TCP upstream, with the relay
    between them."""

    def __init__(
        self,
        client: anyio.abc.ByteStream,
        upstream: anyio.abc.SocketStream,
    ) -> None:
        self.client = client
        self.upstream = upstream


@pytest.fixture
async def tunnel() -> AsyncIterator[Tunnel]:
    server_context, client_context = contexts()
    client_tcp, proxy_client_side = await tcp_pair()
    proxy_upstream_side, upstream = await tcp_pair()
    for stream in (client_tcp, upstream):
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER_BYTES)
    async with anyio.create_task_group() as group:
        accepted: list[ServerTLSStream] = []

        async def accept() -> None:
            accepted.append(
                await ServerTLSStream.wrap(proxy_client_side, server_context)
            )

        group.start_soon(accept)
        client = await TLSStream.wrap(
            client_tcp, hostname="server.test", ssl_context=client_context
        )
    async with anyio.create_task_group() as group:
        group.start_soon(relay, accepted[0], proxy_upstream_side, 120.0)
        # One exchange each way first. Until its first `receive`, an anyio
        # socket stream lets the event loop read all the peer sends into an
        # unbounded queue, which would hide the relay's back-pressure.
        with anyio.fail_after(TRANSFER_TIMEOUT_SECONDS):
            await client.send(b"ping")
            assert await upstream.receive() == b"ping"
            await upstream.send(b"pong")
            assert await client.receive() == b"pong"
        yield Tunnel(client, upstream)
        group.cancel_scope.cancel()
    await anyio.aclose_forcefully(client)
    await upstream.aclose()


async def check_backpressure(
    writer: anyio.abc.ByteStream, reader: anyio.abc.ByteStream
) -> None:
    writes = TRANSFER_BYTES // WRITE_BYTES
    stalled_at, received = await stall_then_read(writer, reader, PATTERN, writes)
    assert stalled_at < TRANSFER_BYTES, "the writer never stopped"
    assert len(received) == TRANSFER_BYTES
    assert received == PATTERN * writes


async def test_upload_waits_for_upstream(tunnel: Tunnel) -> None:
    await check_backpressure(tunnel.client, tunnel.upstream)


async def test_download_waits_for_client(tunnel: Tunnel) -> None:
    await check_backpressure(tunnel.upstream, tunnel.client)
