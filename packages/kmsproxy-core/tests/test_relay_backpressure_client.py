"""Back-pressure through the relay on the upstream side: kmsproxy's
`TLSClientStream` to Python's `ssl` server on 127.0.0.1, with plain TCP on
the client side. A reader that stops reading stops the writer on the other
side after a bounded number of bytes, in both directions, and every byte
still arrives in order once it reads again.

`test_relay_backpressure.py` checks the same for the proxy's
`ServerTLSStream` on the client side.
"""

from __future__ import annotations

import itertools
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

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
from peers import LOOPBACK
from pki import issue, make_ca

from kmsproxy.proxy.tunnel import relay
from kmsproxy.tls import TLSClientConfig, TLSClientStream, TrustStore, connect_tls

pytestmark = pytest.mark.anyio

SERVER_NAME = "server.test"

# Bytes per send of the writer. Not a multiple of the 16 KiB record size, so
# records and relay steps end at different offsets.
WRITE_BYTES = 2**18 + 1001

# Idle timeout of the relay under test, longer than any step here.
RELAY_IDLE_TIMEOUT_SECONDS = 120.0

# One pattern, so bytes delivered twice or out of order change the result.
PATTERN = bytes(itertools.islice(itertools.cycle(range(253)), WRITE_BYTES))

# Whole writes of PATTERN that make up at least TRANSFER_BYTES.
WRITES = -(-TRANSFER_BYTES // WRITE_BYTES)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Tunnel:
    """The two ends of a tunnel whose upstream side is kmsproxy's TLS
    client: a plain TCP client, and Python's `ssl` server as the upstream,
    with the relay between them."""

    def __init__(self, client: anyio.abc.ByteStream, upstream: TLSStream) -> None:
        self.client = client
        self.upstream = upstream


async def tcp_pair() -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]:
    """Return both ends of one loopback TCP connection."""
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    async with listener:
        client = await anyio.connect_tcp(LOOPBACK, port)
        server = await listener.listeners[0].accept()  # type: ignore[attr-defined]
    return client, server


def shrink_receive_buffer(stream: anyio.abc.SocketStream) -> None:
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER_BYTES)


@pytest.fixture
async def tunnel(tmp_path: Path) -> AsyncIterator[Tunnel]:
    ca = make_ca()
    key, cert = issue(ca, SERVER_NAME, dns_names=(SERVER_NAME,)).write(
        tmp_path, "server"
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    settings = TLSClientConfig(SERVER_NAME, (), TrustStore([ca.cert]))

    client, proxy_client_side = await tcp_pair()
    proxy_upstream_side, upstream_tcp = await tcp_pair()
    shrink_receive_buffer(client)
    shrink_receive_buffer(upstream_tcp)
    accepted: list[TLSStream] = []
    async with anyio.create_task_group() as group:

        async def accept() -> None:
            accepted.append(
                await TLSStream.wrap(
                    upstream_tcp, server_side=True, ssl_context=server_context
                )
            )

        group.start_soon(accept)
        with anyio.fail_after(TRANSFER_TIMEOUT_SECONDS):
            upstream_client: TLSClientStream = await connect_tls(
                proxy_upstream_side, settings
            )
    upstream = accepted[0]

    async with anyio.create_task_group() as group:
        group.start_soon(
            relay, proxy_client_side, upstream_client, RELAY_IDLE_TIMEOUT_SECONDS
        )
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
    await client.aclose()
    await anyio.aclose_forcefully(upstream)


async def check_backpressure(
    writer: anyio.abc.ByteStream, reader: anyio.abc.ByteStream
) -> None:
    stalled_at, received = await stall_then_read(writer, reader, PATTERN, WRITES)
    assert stalled_at < TRANSFER_BYTES, "the writer never stopped"
    assert len(received) == WRITES * WRITE_BYTES
    assert received == PATTERN * WRITES


async def test_upload_waits_for_upstream(tunnel: Tunnel) -> None:
    await check_backpressure(tunnel.client, tunnel.upstream)


async def test_download_waits_for_client(tunnel: Tunnel) -> None:
    await check_backpressure(tunnel.upstream, tunnel.client)
