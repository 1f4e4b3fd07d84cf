"""`TLSClientStream` under load and failure: full-duplex transfers through a
blocking Python `ssl` echo server, and signers that fail in unexpected ways.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
from peers import LOOPBACK, serve_python_tls, start_openssl_server
from pki import issue, make_ca

from kmsproxy.signer import SignatureScheme, SoftwareSigner
from kmsproxy.tls import (
    SIGNATURE_TIMEOUT_SECONDS,
    AlertDescription,
    AlertReceived,
    ClientIdentity,
    SignatureFailed,
    TLSClientConfig,
    TrustStore,
    connect_tls,
)

pytestmark = pytest.mark.anyio

SERVER_NAME = "server.test"

# Bytes each direction carries in the full-duplex test: far more than the
# loopback socket buffers hold, so each side must read while it writes.
DUPLEX_BYTES = 32 * 2**20

# Bound on the full-duplex transfer. It takes a few seconds on a loaded
# machine; a deadlock never finishes, so only the bound ends it.
DUPLEX_TIMEOUT_SECONDS = 120.0

# Bytes per send() in the full-duplex test.
CHUNK_BYTES = 64 * 1024

# Bound on waiting for a local peer's reply, which takes milliseconds.
PEER_REPLY_TIMEOUT_SECONDS = 10.0

# Time the echo thread gets to finish after the client closes.
ECHO_JOIN_TIMEOUT_SECONDS = 10.0


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


@contextlib.contextmanager
def blocking_echo_server(cert: Path, key: Path) -> Iterator[int]:
    """Run a thread that echoes one TLS connection with blocking `sendall`.

    The server stops reading while a `sendall` waits for the client to read,
    as most servers do, so a client that cannot read while it writes
    deadlocks. Yields the loopback port.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    listener = socket.create_server((LOOPBACK, 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with context.wrap_socket(connection, server_side=True) as tls:
                while data := tls.recv(CHUNK_BYTES):
                    tls.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(ECHO_JOIN_TIMEOUT_SECONDS)


async def test_full_duplex_32_mib(tmp_path: Path) -> None:
    ca = make_ca()
    key, cert = issue(ca, "server", dns_names=(SERVER_NAME,)).write(tmp_path, "s")
    settings = TLSClientConfig(SERVER_NAME, (), TrustStore([ca.cert]))
    chunk = bytes(range(256)) * (CHUNK_BYTES // 256)
    received = 0
    with blocking_echo_server(cert, key) as port:
        transport = await anyio.connect_tcp(LOOPBACK, port)
        stream = await connect_tls(transport, settings)

        async def send_all() -> None:
            for _ in range(DUPLEX_BYTES // CHUNK_BYTES):
                await stream.send(chunk)

        async def receive_all() -> None:
            nonlocal received
            while received < DUPLEX_BYTES:
                received += len(await stream.receive())

        async with stream:
            with anyio.fail_after(DUPLEX_TIMEOUT_SECONDS):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(send_all)
                    tasks.start_soon(receive_all)
    assert received == DUPLEX_BYTES


class GatheringTransport(anyio.abc.ByteStream):
    """A transport that, once `gather` is set, holds back received bytes
    until it has that many, then returns them from one `receive`.

    It makes a large read of several records happen on every machine,
    where a real socket delivers them together only when the peer is fast.
    """

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self.inner = inner
        self.gather = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.gather:
            return await self.inner.receive(max_bytes)
        gathered = bytearray()
        while len(gathered) < self.gather:
            gathered += await self.inner.receive()
        self.gather = 0
        return bytes(gathered)

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_receive_joins_records(tmp_path: Path) -> None:
    ca = make_ca()
    key, cert = issue(ca, "server", dns_names=(SERVER_NAME,)).write(tmp_path, "s")
    settings = TLSClientConfig(SERVER_NAME, (), TrustStore([ca.cert]))
    # Three records each way; the echo server returns one record per read.
    message = bytes(range(256)) * 160
    async with serve_python_tls(cert, key, None) as peer:
        transport = GatheringTransport(await anyio.connect_tcp(LOOPBACK, peer.port))
        stream = await connect_tls(transport, settings)
        async with stream:
            transport.gather = len(message)
            await stream.send(message)
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                first = await stream.receive(20000)
                rest = b""
                while len(first) + len(rest) < len(message):
                    rest += await stream.receive()
    # 20,000 bytes span two records, so the first receive joined them.
    assert len(first) == 20000
    assert first + rest == message


async def test_protocol_version_alert_hint(tmp_path: Path) -> None:
    # A server without TLS 1.3 and 1.2 replies to our ClientHello with a fatal
    # protocol_version alert (RFC 5246 section 7.2.2), as these bytes do.
    alert_record = bytes([21, 3, 3, 0, 2, 2, 70])

    async def reject(client: anyio.abc.SocketStream) -> None:
        async with client:
            await client.receive()
            await client.send(alert_record)

    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    settings = TLSClientConfig(SERVER_NAME, (), TrustStore([make_ca().cert]))
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, reject)
        transport = await anyio.connect_tcp(LOOPBACK, port)
        async with transport:
            with (
                anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS),
                pytest.raises(AlertReceived) as caught,
            ):
                await connect_tls(transport, settings)
        tasks.cancel_scope.cancel()
    assert caught.value.description == AlertDescription.protocol_version
    assert str(caught.value) == (
        "server sent alert protocol_version (70); the server supports none of "
        "the TLS versions this client offered (1.3 and 1.2, or 1.2 alone for a "
        "key without a TLS 1.3 scheme)"
    )


class SlowTransport(anyio.abc.ByteStream):
    """A transport whose sends wait `delay` seconds before they start, so a
    caller's timeout can cancel a write midway."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self.inner = inner
        self.delay = 0.0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await anyio.sleep(self.delay)
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_cancelled_send_breaks_stream(tmp_path: Path) -> None:
    # A write cut short may have sent part of a record, so later writes
    # must fail instead of sending records the server cannot decrypt.
    ca = make_ca()
    key, cert = issue(ca, "server", dns_names=(SERVER_NAME,)).write(tmp_path, "s")
    settings = TLSClientConfig(SERVER_NAME, (), TrustStore([ca.cert]))
    async with serve_python_tls(cert, key, None) as peer:
        transport = SlowTransport(await anyio.connect_tcp(LOOPBACK, peer.port))
        stream = await connect_tls(transport, settings)
        async with stream:
            transport.delay = PEER_REPLY_TIMEOUT_SECONDS
            with anyio.move_on_after(0.1) as scope:
                await stream.send(b"cut short")
            transport.delay = 0.0
            assert scope.cancelled_caught
            with pytest.raises(anyio.BrokenResourceError, match="interrupted"):
                await stream.send(b"after")


class UnpluggedSigner(SoftwareSigner):
    """A plugin Signer that fails with an exception other than SignerError."""

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        raise RuntimeError("device unplugged")


class HangingSigner(SoftwareSigner):
    """A Signer that waits forever, like a token waiting for a touch."""

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def handshake_with_signer(
    tmp_path: Path,
    signer_class: type[SoftwareSigner],
    signature_timeout: float = SIGNATURE_TIMEOUT_SECONDS,
) -> tuple[SignatureFailed, str]:
    """Handshake with `openssl s_server` that requires a client certificate.

    Return the SignatureFailed raised and the server's log. Fail when
    connect_tls closed the transport, which the caller owns.
    """
    ca = make_ca()
    key, cert = issue(ca, "server", dns_names=(SERVER_NAME,)).write(tmp_path, "s")
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca.chain_pem())
    client = issue(ca, "client", client=True)
    identity = ClientIdentity(
        tuple(client.chain), signer_class(client.key, "plugin:name=client")
    )
    config = TLSClientConfig(
        SERVER_NAME,
        [identity],
        TrustStore([ca.cert]),
        signature_timeout=signature_timeout,
    )
    with start_openssl_server(tmp_path, cert, key, ca_path) as peer:
        transport = await anyio.connect_tcp(LOOPBACK, peer.port)
        async with transport:
            with pytest.raises(SignatureFailed) as caught:
                await connect_tls(transport, config)
            # Raises ClosedResourceError if connect_tls closed the transport.
            await transport.send(b"")
        peer.wait_for_log("internal error")
        log = peer.log()
    return caught.value, log


async def test_signer_runtime_error(tmp_path: Path) -> None:
    failure, log = await handshake_with_signer(tmp_path, UnpluggedSigner)
    assert isinstance(failure.__cause__, RuntimeError)
    assert "RuntimeError: device unplugged" in str(failure)
    assert failure.description == AlertDescription.internal_error
    assert "internal error" in log


async def test_signer_hang_times_out(tmp_path: Path) -> None:
    with anyio.fail_after(DUPLEX_TIMEOUT_SECONDS):
        failure, log = await handshake_with_signer(
            tmp_path, HangingSigner, signature_timeout=0.5
        )
    assert "timed out after 0.5 s" in str(failure)
    assert isinstance(failure.__cause__, TimeoutError)
    assert "internal error" in log
