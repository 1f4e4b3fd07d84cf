"""Batched delivery through `TLSClientStream` against Python's `ssl` server:
many records and a close_notify in one transport read, for TLS 1.3 and 1.2.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from peers import LOOPBACK
from pki import issue, make_ca
from test_tls_stream import GatheringTransport

from kmsproxy.tls import TLSClientConfig, TrustStore, connect_tls
from kmsproxy.tls.records import MAX_PLAINTEXT_LENGTH
from kmsproxy.tls.stream import TLSClientStream

pytestmark = pytest.mark.anyio

SERVER_NAME = "server.test"

# Records the server writes before its close_notify. The client gathers
# them into one transport read.
RECORD_COUNT = 16

# Minimum bytes a TLS 1.3 or 1.2 AEAD record adds to its content, a 5-byte
# header and a 16-byte tag. TLS 1.3 adds a content type byte, and TLS 1.2
# AES-GCM an 8-byte explicit nonce.
MIN_RECORD_OVERHEAD = 5 + 16

# Bound on the whole exchange with the local server, which takes
# milliseconds, so only a hang reaches it.
EXCHANGE_TIMEOUT_SECONDS = 10.0

# Time the server thread gets to finish after the test.
SERVER_JOIN_TIMEOUT_SECONDS = 10.0

# Bound on receive() calls while draining the stream. The data fits in one
# read, so a few calls suffice.
MAX_RECEIVES = 100


def record_contents() -> list[bytes]:
    pattern = itertools.cycle(range(251))
    return [
        bytes(itertools.islice(pattern, MAX_PLAINTEXT_LENGTH))
        for _ in range(RECORD_COUNT)
    ]


@contextlib.contextmanager
def writing_server(
    cert: Path, key: Path, version: ssl.TLSVersion, contents: list[bytes]
) -> Iterator[int]:
    """Run a thread that accepts one TLS connection, waits for one byte,
    writes each of `contents` as one record, then sends close_notify.
    Yields the loopback port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = version
    context.maximum_version = version
    # No session tickets, so nothing but data follows the handshake.
    context.num_tickets = 0
    context.load_cert_chain(cert, key)
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(EXCHANGE_TIMEOUT_SECONDS)

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            connection.settimeout(EXCHANGE_TIMEOUT_SECONDS)
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1)
                for content in contents:
                    tls.sendall(content)
                tls.unwrap()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(SERVER_JOIN_TIMEOUT_SECONDS)


async def receive_until_end(stream: TLSClientStream, max_bytes: int) -> list[bytes]:
    """Return the result of each `receive` until `anyio.EndOfStream`."""
    received: list[bytes] = []
    for _ in range(MAX_RECEIVES):
        try:
            received.append(await stream.receive(max_bytes))
        except anyio.EndOfStream:
            return received
    raise AssertionError(f"no close_notify after {MAX_RECEIVES} receives")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("version", "version_name"),
    [
        pytest.param(ssl.TLSVersion.TLSv1_3, "TLSv1.3", id="tls13"),
        pytest.param(ssl.TLSVersion.TLSv1_2, "TLSv1.2", id="tls12"),
    ],
)
async def test_records_and_close_notify_in_one_read(
    tmp_path: Path, version: ssl.TLSVersion, version_name: str
) -> None:
    ca = make_ca()
    key, cert = issue(ca, "server", dns_names=(SERVER_NAME,)).write(tmp_path, "s")
    settings = TLSClientConfig(SERVER_NAME, (), TrustStore([ca.cert]))
    contents = record_contents()
    expected = b"".join(contents)
    with (
        writing_server(cert, key, version, contents) as port,
        anyio.fail_after(EXCHANGE_TIMEOUT_SECONDS),
    ):
        transport = GatheringTransport(await anyio.connect_tcp(LOOPBACK, port))
        stream = await connect_tls(transport, settings)
        async with stream:
            assert stream.version == version_name
            # All data records but part of the last one, at least, in one read.
            transport.gather = len(expected) + RECORD_COUNT * MIN_RECORD_OVERHEAD
            await stream.send(b"go")
            received = await receive_until_end(stream, len(expected))
    assert len(received[0]) >= (RECORD_COUNT - 1) * MAX_PLAINTEXT_LENGTH
    assert b"".join(received) == expected
