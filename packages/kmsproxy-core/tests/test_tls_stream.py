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
import pytest
from peers import LOOPBACK
from pki import issue, make_ca

from kmsproxy.tls import TLSClientConfig, TrustStore, connect_tls

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

# Time the echo thread gets to finish after the client closes.
ECHO_JOIN_TIMEOUT_SECONDS = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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
