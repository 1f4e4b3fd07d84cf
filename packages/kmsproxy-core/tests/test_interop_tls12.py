"""The TLS 1.2 interop matrix: GnuTLS, Go and Node.js servers that accept
TLS 1.2 only, against P-256, P-384, RSA-2048, RSA-3072 and Ed25519 client
keys.

The client offers TLS 1.3 and 1.2, so every case also covers the hand-over
to the TLS 1.2 machine. Each case handshakes with client authentication,
moves 1 MiB each way through the server's echo, and closes with
close_notify in both directions. Servers are shared by all cases of the
module and started on first use.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from interop_matrix import (
    MIB,
    Matrix,
    cached,
    echo_through,
    make_matrix,
    peer_cache,
    random_bytes,
    text_lines,
)
from peers import Peer, start_gnutls_server, start_go_server, start_node_server
from pki import KeyType
from test_interop_peers import (
    go_server_binary,
    split_header,
)

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

__all__ = ["go_server_binary", "peer_cache"]

KEY_TYPES: list[KeyType] = ["p256", "p384", "rsa2048", "rsa3072", "ed25519"]

# GnuTLS priority string that allows TLS 1.2 and nothing else.
GNUTLS_TLS12_ONLY = "NORMAL:-VERS-ALL:+VERS-TLS1.2"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    directory = tmp_path_factory.mktemp("tls12-matrix")
    return make_matrix(directory, "tls12 matrix CA", KEY_TYPES)


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_gnutls(
    matrix: Matrix, peer_cache: dict[object, Peer], key_type: KeyType
) -> None:
    peer = cached(
        peer_cache,
        ("gnutls",),
        lambda: start_gnutls_server(
            matrix.files.directory,
            matrix.cert,
            matrix.key,
            matrix.files.ca_path,
            priority=GNUTLS_TLS12_ONLY,
        ),
    )
    identity = matrix.identities[key_type]
    payload = text_lines(MIB)
    stream, reply = await echo_through(peer.port, matrix, identity, payload)
    assert stream.version == "TLSv1.2"
    assert stream.client_identity == identity
    assert len(reply) == len(payload)
    assert reply == payload


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_go(
    matrix: Matrix,
    peer_cache: dict[object, Peer],
    go_server_binary: Path,
    key_type: KeyType,
) -> None:
    peer = cached(
        peer_cache,
        ("go",),
        lambda: start_go_server(
            matrix.files.directory,
            go_server_binary,
            matrix.cert,
            matrix.key,
            matrix.files.ca_path,
            max_version="1.2",
        ),
    )
    identity = matrix.identities[key_type]
    payload = random_bytes(MIB)
    stream, reply = await echo_through(peer.port, matrix, identity, payload)
    fields, echoed = split_header(reply)
    assert stream.version == "TLSv1.2"
    assert fields["version"] == "TLS 1.2"
    assert fields["subject"] == f"CN=client {key_type}"
    assert fields["suite"] == stream.cipher_suite
    assert len(echoed) == len(payload)
    assert echoed == payload


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_node(
    matrix: Matrix, peer_cache: dict[object, Peer], key_type: KeyType
) -> None:
    peer = cached(
        peer_cache,
        ("node",),
        lambda: start_node_server(
            matrix.files.directory,
            matrix.cert,
            matrix.key,
            matrix.files.ca_path,
            version="TLSv1.2",
        ),
    )
    identity = matrix.identities[key_type]
    payload = random_bytes(MIB)
    stream, reply = await echo_through(peer.port, matrix, identity, payload)
    fields, echoed = split_header(reply)
    assert stream.version == "TLSv1.2"
    assert fields["version"] == "TLSv1.2"
    assert fields["subject"] == f"CN=client {key_type}"
    assert fields["suite"] == stream.cipher_suite
    assert len(echoed) == len(payload)
    assert echoed == payload
