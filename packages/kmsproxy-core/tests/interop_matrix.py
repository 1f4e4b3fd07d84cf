"""The interop matrices' shared parts: PKI, a cache of started servers, payloads.

`test_interop_matrix.py` (TLS 1.3) and `test_interop_tls12.py` (TLS 1.2)
run every client key type against the same real servers. Each module builds
one `Matrix` and starts each server configuration once, on first use.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import Peer
from pki import KeyType
from test_interop_peers import Files, exchange, make_files, open_tls

from kmsproxy.tls import ClientIdentity, TLSClientStream

MIB = 1 << 20


@dataclass
class Matrix:
    """The module's PKI: one CA, one server certificate, one client per key."""

    files: Files
    cert: Path
    key: Path
    identities: dict[KeyType, ClientIdentity]


def make_matrix(directory: Path, ca_name: str, key_types: list[KeyType]) -> Matrix:
    """Write a CA and a P-256 server certificate, and issue a client per key type."""
    files = make_files(directory, ca_name)
    cert, key = files.server("p256")
    identities = {key_type: files.client(key_type) for key_type in key_types}
    return Matrix(files, cert, key, identities)


@pytest.fixture(scope="module")
def peer_cache() -> Iterator[dict[object, Peer]]:
    """Servers started on first use by a case, keyed by their settings, and
    stopped by PID when the module ends."""
    cache: dict[object, Peer] = {}
    yield cache
    for peer in cache.values():
        peer.stop()


def cached(
    cache: dict[object, Peer], settings: object, start: Callable[[], Peer]
) -> Peer:
    """Return the server for `settings`, starting it if this is its first use
    or if it exited."""
    peer = cache.get(settings)
    if peer is None or peer.process.poll() is not None:
        peer = start()
        cache[settings] = peer
    return peer


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def text_lines(size: int) -> bytes:
    """Return at most `size` bytes of base64 text in whole 76-character lines.

    gnutls-serv's echo and s_server's `-rev` work on text, so these peers
    get bytes without NUL, and s_server gets whole lines.
    """
    encoded = base64.encodebytes(os.urandom(size))
    return encoded[:size].rsplit(b"\n", 1)[0] + b"\n"


def reverse_lines(data: bytes) -> bytes:
    return b"".join(line[::-1] + b"\n" for line in data.split(b"\n")[:-1])


async def echo_through(
    port: int, matrix: Matrix, identity: ClientIdentity, payload: bytes
) -> tuple[TLSClientStream, bytes]:
    """Handshake on `port` as `identity`, send `payload`, and read the reply
    up to the server's close_notify. Return the closed stream and the reply."""
    stream = await open_tls(port, matrix.files.config(identity))
    async with stream:
        reply = await exchange(stream, payload)
    return stream, reply
