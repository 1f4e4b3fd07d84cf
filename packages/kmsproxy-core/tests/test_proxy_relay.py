"""The relay and the server TLS stream: half-close, idle timeout, errors."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSStream
from cryptography.hazmat.primitives import serialization
from pki import issue, make_ca
from test_tls_stream import GatheringTransport

from kmsproxy.ca import server_context
from kmsproxy.proxy.tls_stream import ServerTLSStream
from kmsproxy.proxy.tunnel import relay

pytestmark = pytest.mark.anyio

# Upper bound for each exchange on loopback, which takes milliseconds.
STEP_TIMEOUT_SECONDS = 10.0


# A program that embeds the proxy may run it on uvloop, so every test here
# runs on the standard asyncio loop and on uvloop.
@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    backend: tuple[str, dict[str, bool]] = request.param
    return backend


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
    started = anyio.current_time()
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        await relay(proxy_client_side, proxy_upstream_side, 0.2)
    assert anyio.current_time() - started >= 0.2
    for stream in (client, server, proxy_client_side, proxy_upstream_side):
        await stream.aclose()


async def test_reset_ends_both_directions() -> None:
    client, proxy_client_side = await tcp_pair()
    proxy_upstream_side, server = await tcp_pair()
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        async with anyio.create_task_group() as group:
            group.start_soon(relay, proxy_client_side, proxy_upstream_side, 60.0)
            raw = server.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
            # SO_LINGER with a zero timeout turns close() into a TCP reset.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await server.aclose()
        # The relay ended, so the proxy closes its client side.
        await proxy_client_side.aclose()
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await client.receive()
    await client.aclose()
    await proxy_upstream_side.aclose()


class SlowSendStream(anyio.abc.ByteStream):
    """A stream whose sends take `delay` seconds, like a slow reader's."""

    def __init__(self, inner: anyio.abc.ByteStream, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    async def send(self, item: bytes) -> None:
        await anyio.sleep(self.delay)
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_slow_send_is_activity() -> None:
    # Idle timeout 0.5 s. The send to the client ends at 0.45 s, and the
    # client speaks at 0.7 s: idle for 0.25 s only, so the tunnel is open.
    client, proxy_client_side = await tcp_pair()
    proxy_upstream_side, server = await tcp_pair()
    slow_client_side = SlowSendStream(proxy_client_side, 0.45)
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        async with anyio.create_task_group() as group:
            group.start_soon(relay, slow_client_side, proxy_upstream_side, 0.5)
            await server.send(b"slow response")
            assert await client.receive() == b"slow response"
            await anyio.sleep(0.25)
            await client.send(b"next request")
            assert await server.receive() == b"next request"
            await client.send_eof()
            await server.send_eof()
    for stream in (client, server, proxy_client_side, proxy_upstream_side):
        await stream.aclose()
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


class GatedTransport(anyio.abc.ByteStream):
    """A transport whose sends wait for `gate` and fail if they overlap."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self.inner = inner
        self.gate = anyio.Event()
        self.sending = False
        self.sent: list[bytes] = []

    async def send(self, item: bytes) -> None:
        assert not self.sending, "two writes to the transport at once"
        self.sending = True
        try:
            await self.gate.wait()
            self.sent.append(item)
            await self.inner.send(item)
        finally:
            self.sending = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_tls_flush_waits_for_sender(
    tls_pair: tuple[anyio.abc.ByteStream, ServerTLSStream],
) -> None:
    _, server = tls_pair
    transport = GatedTransport(server.transport)
    server.transport = transport
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        async with anyio.create_task_group() as group:
            group.start_soon(server.send, b"from send")
            await anyio.wait_all_tasks_blocked()
            # Output that OpenSSL queues while reading (an alert or a
            # KeyUpdate response) is flushed from receive's task.
            server._outgoing.write(b"queued by receive")
            await server._flush(wait=False)
            assert transport.sent == []
            transport.gate.set()
        assert transport.sent[-1].endswith(b"queued by receive")


async def test_tls_receive_joins_records(
    tls_pair: tuple[anyio.abc.ByteStream, ServerTLSStream],
) -> None:
    client, server = tls_pair
    transport = GatheringTransport(server.transport)
    server.transport = transport
    # Python's ssl sends this as three records in one write.
    message = bytes(range(256)) * 160
    transport.gather = len(message)
    await client.send(message)
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        first = await server.receive(20000)
        rest = b""
        while len(first) + len(rest) < len(message):
            rest += await server.receive()
    # 20,000 bytes span two records, so the first receive joined them.
    assert len(first) == 20000
    assert first + rest == message
