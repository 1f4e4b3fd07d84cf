"""`TLSClientStream.receive` with a `max_bytes` smaller than the decrypted
data waiting: each call returns exactly as many bytes as fit, in order,
across record and event boundaries.

The handshake and the server's records run in memory against Python's
`ssl`, so every event is in place before the first `receive`, and the
stream never needs its transport.
"""

from __future__ import annotations

import itertools
import ssl
from pathlib import Path

import anyio.abc
import pytest
from pki import issue, make_ca

from kmsproxy.tls import TLSClientConfig, TrustStore
from kmsproxy.tls.client import ClientConnection
from kmsproxy.tls.records import MAX_PLAINTEXT_LENGTH
from kmsproxy.tls.stream import TLSClientStream

pytestmark = pytest.mark.anyio

SERVER_NAME = "server.test"

# Flights one in-memory TLS 1.3 handshake takes: ClientHello, our Finished,
# and spares.
MAX_FLIGHTS = 4

# Record contents the server writes, fed to the client in batches of
# records, one ApplicationData event per batch. Sizes are odd, so reads
# end inside records and inside events.
BATCHES = (
    (MAX_PLAINTEXT_LENGTH, MAX_PLAINTEXT_LENGTH, 777),
    (5,),
    (MAX_PLAINTEXT_LENGTH, 12_345),
)

# Bound on receive() calls: the smallest max_bytes below needs 63.
MAX_RECEIVES = 200


class NoTransport(anyio.abc.ByteStream):
    """A transport for a stream whose data is all decrypted already: any
    use fails the test."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        raise AssertionError("the stream read its transport")

    async def send(self, item: bytes) -> None:
        raise AssertionError("the stream wrote to its transport")

    async def send_eof(self) -> None:
        raise AssertionError("the stream sent EOF")

    async def aclose(self) -> None:
        pass


class MemoryServer:
    """Python's `ssl` server end of one in-memory TLS 1.3 connection."""

    def __init__(self, directory: Path) -> None:
        ca = make_ca()
        key, cert = issue(ca, "server", dns_names=(SERVER_NAME,)).write(directory, "s")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        # No session tickets, so only application data follows the handshake.
        context.num_tickets = 0
        context.load_cert_chain(cert, key)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.trust = TrustStore([ca.cert])

    def handshake(self, client: ClientConnection) -> None:
        """Complete the handshake with `client`, within MAX_FLIGHTS."""
        client.start()
        for _ in range(MAX_FLIGHTS):
            self.incoming.write(client.data_to_send())
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                client.receive_data(self.outgoing.read())
            else:
                return
        raise AssertionError(f"no handshake within {MAX_FLIGHTS} flights")

    def records(self, contents: list[bytes]) -> bytes:
        """Return the records that carry each of `contents`, one each."""
        for content in contents:
            self.tls.write(content)
        return self.outgoing.read()


def batch_contents() -> list[list[bytes]]:
    """Return the contents of BATCHES, with no byte repeating within 251
    bytes, so a chunk returned twice or out of order changes the result."""
    pattern = itertools.cycle(range(251))
    return [
        [bytes(itertools.islice(pattern, size)) for size in batch] for batch in BATCHES
    ]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    "max_bytes", [1000, 4096, MAX_PLAINTEXT_LENGTH + 1, 20_000, 40_000]
)
async def test_small_receives_keep_order(tmp_path: Path, max_bytes: int) -> None:
    server = MemoryServer(tmp_path)
    client = ClientConnection(TLSClientConfig(SERVER_NAME, (), server.trust))
    server.handshake(client)
    assert client.handshake_complete
    batches = batch_contents()
    for batch in batches:
        client.receive_data(server.records(batch))
    expected = b"".join(itertools.chain.from_iterable(batches))
    stream = TLSClientStream(NoTransport(), client)
    received: list[bytes] = []
    for _ in range(MAX_RECEIVES):
        if sum(map(len, received)) == len(expected):
            break
        received.append(await stream.receive(max_bytes))
    else:
        raise AssertionError(f"data incomplete after {MAX_RECEIVES} receives")
    assert b"".join(received) == expected
    # Every event is in place, so each call fills max_bytes but the last.
    assert all(len(chunk) == max_bytes for chunk in received[:-1])
    assert 0 < len(received[-1]) <= max_bytes
