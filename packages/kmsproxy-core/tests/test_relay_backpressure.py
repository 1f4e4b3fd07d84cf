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
from test_proxy_relay import contexts, tcp_pair

from kmsproxy.proxy.tls_stream import ServerTLSStream
from kmsproxy.proxy.tunnel import relay

pytestmark = pytest.mark.anyio

# Bytes the writer tries to send while the reader is stopped. The kernel
# buffers of the two loopback hops hold a few MiB, and the relay holds one
# step. A relay that kept reading without waiting for its sends would take
# all of it.
TRANSFER_BYTES = 64 * 2**20

# Bytes per send of the writer.
WRITE_BYTES = 2**18

# The writer counts as stopped when no send completed for this long.
STALL_SECONDS = 1.0

# Upper bound for the whole transfer once the reader reads again. Loopback
# moves 64 MiB through TLS in a few seconds even on a loaded machine.
TRANSFER_TIMEOUT_SECONDS = 60.0

# Receive buffer of the stopped reader's socket, in bytes, so that the
# kernel cannot hide a missing back-pressure by buffering everything.
SMALL_RECEIVE_BUFFER_BYTES = 64 * 1024

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


async def write_until_done(stream: anyio.abc.ByteStream, sent: list[int]) -> None:
    while sent[0] < TRANSFER_BYTES:
        await stream.send(PATTERN)
        sent[0] += len(PATTERN)


async def wait_for_stall(sent: list[int]) -> None:
    """Wait until `sent` stops growing for STALL_SECONDS or reaches
    TRANSFER_BYTES, for at most TRANSFER_TIMEOUT_SECONDS."""
    with anyio.fail_after(TRANSFER_TIMEOUT_SECONDS):
        while sent[0] < TRANSFER_BYTES:
            before = sent[0]
            await anyio.sleep(STALL_SECONDS)
            if sent[0] == before:
                return


async def read_exactly(stream: anyio.abc.ByteStream, length: int) -> bytes:
    received = bytearray()
    with anyio.fail_after(TRANSFER_TIMEOUT_SECONDS):
        while len(received) < length:
            received += await stream.receive(2**20)
    return bytes(received)


async def check_backpressure(
    writer: anyio.abc.ByteStream, reader: anyio.abc.ByteStream
) -> None:
    sent = [0]
    async with anyio.create_task_group() as group:
        group.start_soon(write_until_done, writer, sent)
        await wait_for_stall(sent)
        stalled_at = sent[0]
        received = await read_exactly(reader, TRANSFER_BYTES)
    assert stalled_at < TRANSFER_BYTES, "the writer never stopped"
    assert len(received) == TRANSFER_BYTES
    assert received == PATTERN * (TRANSFER_BYTES // WRITE_BYTES)


async def test_upload_waits_for_upstream(tunnel: Tunnel) -> None:
    await check_backpressure(tunnel.client, tunnel.upstream)


async def test_download_waits_for_client(tunnel: Tunnel) -> None:
    await check_backpressure(tunnel.upstream, tunnel.client)
