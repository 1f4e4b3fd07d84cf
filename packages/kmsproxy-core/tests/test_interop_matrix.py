"""The TLS 1.3 interop matrix: every real peer against every client key type.

Each case handshakes with client authentication, moves 1 MiB each way, and
closes with close_notify in both directions. Servers are shared by all cases
of a module (`module`-scoped fixtures) and started on first use, so the file
starts each server configuration once.

Peers and what "1 MiB both ways" means for each:
- `openssl s_server -rev`: every suite, HelloRetryRequest forced by offering
  only P-384 on the server, tickets on and off. The payload goes out as lines
  and comes back with each line reversed.
- `gnutls-serv --echo`, Go `crypto/tls`, Node.js `tls`, Python `ssl`: echo.
- Apache httpd: an HTTP/1.0 POST (so the response is not chunked) to
  `/protected/echo`, whose `<Location>` requires a client certificate by
  post-handshake authentication; the CGI returns the body.
- nginx: a POST of 1 MiB (read and discarded by nginx) and a 1 MiB response.
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
    reverse_lines,
    text_lines,
)
from peers import (
    Peer,
    serve_python_tls,
    start_apache,
    start_gnutls_server,
    start_go_server,
    start_nginx,
    start_node_server,
    start_openssl_server,
)
from pki import KeyType
from test_interop_peers import (
    go_server_binary,
    http_exchange,
    http_request,
    open_tls,
    split_header,
)

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

__all__ = ["go_server_binary", "peer_cache"]

KEY_TYPES: list[KeyType] = ["rsa2048", "rsa3072", "p256", "p384", "ed25519"]

SUITES = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
]

# A group the client offers in supported_groups but sends no key share for,
# so a server limited to it must answer with HelloRetryRequest.
RETRY_GROUP = "P-384"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    return make_matrix(tmp_path_factory.mktemp("matrix"), "matrix CA", KEY_TYPES)


# openssl s_server


@pytest.mark.parametrize("tickets", [True, False], ids=["tickets", "no-tickets"])
@pytest.mark.parametrize("retry", [False, True], ids=["direct", "retry"])
@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_s_server(
    matrix: Matrix,
    peer_cache: dict[object, Peer],
    key_type: KeyType,
    suite: str,
    retry: bool,
    tickets: bool,
) -> None:
    extra_args = [] if tickets else ["-no_ticket"]
    peer = cached(
        peer_cache,
        ("s_server", suite, retry, tickets),
        lambda: start_openssl_server(
            matrix.files.directory,
            matrix.cert,
            matrix.key,
            matrix.files.ca_path,
            mode="-rev",
            ciphersuites=suite,
            groups=RETRY_GROUP if retry else None,
            extra_args=extra_args,
        ),
    )
    identity = matrix.identities[key_type]
    payload = text_lines(MIB)
    stream, reply = await echo_through(peer.port, matrix, identity, payload)
    assert stream.cipher_suite == suite
    assert stream.connection.hello_retry_requested == retry
    assert stream.client_identity == identity
    assert len(reply) == len(payload)
    assert reply == reverse_lines(payload)


# GnuTLS


@pytest.mark.parametrize("tickets", [True, False], ids=["tickets", "no-tickets"])
@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_gnutls(
    matrix: Matrix, peer_cache: dict[object, Peer], key_type: KeyType, tickets: bool
) -> None:
    peer = cached(
        peer_cache,
        ("gnutls", tickets),
        lambda: start_gnutls_server(
            matrix.files.directory,
            matrix.cert,
            matrix.key,
            matrix.files.ca_path,
            tickets=tickets,
        ),
    )
    identity = matrix.identities[key_type]
    payload = text_lines(MIB)
    stream, reply = await echo_through(peer.port, matrix, identity, payload)
    assert stream.client_identity == identity
    assert len(reply) == len(payload)
    assert reply == payload


# Go crypto/tls


@pytest.mark.parametrize("tickets", [True, False], ids=["tickets", "no-tickets"])
@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_go(
    matrix: Matrix,
    peer_cache: dict[object, Peer],
    go_server_binary: Path,
    key_type: KeyType,
    tickets: bool,
) -> None:
    peer = cached(
        peer_cache,
        ("go", tickets),
        lambda: start_go_server(
            matrix.files.directory,
            go_server_binary,
            matrix.cert,
            matrix.key,
            matrix.files.ca_path,
            tickets=tickets,
        ),
    )
    identity = matrix.identities[key_type]
    payload = random_bytes(MIB)
    stream, reply = await echo_through(peer.port, matrix, identity, payload)
    fields, echoed = split_header(reply)
    assert fields["subject"] == f"CN=client {key_type}"
    assert fields["suite"] == stream.cipher_suite
    assert len(echoed) == len(payload)
    assert echoed == payload


# Node.js tls


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_node(
    matrix: Matrix, peer_cache: dict[object, Peer], key_type: KeyType
) -> None:
    peer = cached(
        peer_cache,
        ("node",),
        lambda: start_node_server(
            matrix.files.directory, matrix.cert, matrix.key, matrix.files.ca_path
        ),
    )
    identity = matrix.identities[key_type]
    payload = random_bytes(MIB)
    stream, reply = await echo_through(peer.port, matrix, identity, payload)
    fields, echoed = split_header(reply)
    assert fields["subject"] == f"CN=client {key_type}"
    assert fields["suite"] == stream.cipher_suite
    assert len(echoed) == len(payload)
    assert echoed == payload


# Apache httpd


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_apache(
    matrix: Matrix, peer_cache: dict[object, Peer], key_type: KeyType
) -> None:
    peer = cached(
        peer_cache,
        ("apache",),
        lambda: start_apache(
            matrix.files.directory, matrix.cert, matrix.key, matrix.files.ca_path
        ),
    )
    identity = matrix.identities[key_type]
    payload = random_bytes(MIB)
    stream = await open_tls(peer.port, matrix.files.config(identity))
    async with stream:
        reply = await http_exchange(
            stream, http_request("POST", "/protected/echo", payload, "HTTP/1.0")
        )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert stream.client_identity == identity
    assert len(body) == len(payload)
    assert body == payload
    assert f"CN=client {key_type}|POST /protected/echo HTTP/1.0|200" in (
        peer.access_log()
    )


# nginx


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_nginx(
    matrix: Matrix, peer_cache: dict[object, Peer], key_type: KeyType
) -> None:
    def start() -> Peer:
        download = matrix.files.directory / "mib.bin"
        download.write_bytes(random_bytes(MIB))
        locations = (
            f"location = /download {{ alias {download}; }}\n"
            "location = /upload { client_max_body_size 2m; return 200 'uploaded'; }"
        )
        return start_nginx(
            matrix.files.directory,
            matrix.cert,
            matrix.key,
            matrix.files.ca_path,
            extra=locations,
        )

    peer = cached(peer_cache, ("nginx",), start)
    identity = matrix.identities[key_type]
    download = (peer.directory.parent / "mib.bin").read_bytes()

    stream = await open_tls(peer.port, matrix.files.config(identity))
    async with stream:
        upload_reply = await http_exchange(
            stream, http_request("POST", "/upload", random_bytes(MIB))
        )
    stream = await open_tls(peer.port, matrix.files.config(identity))
    async with stream:
        download_reply = await http_exchange(stream, http_request("GET", "/download"))

    assert upload_reply.startswith(b"HTTP/1.1 200")
    assert upload_reply.endswith(b"\r\n\r\nuploaded")
    assert download_reply.startswith(b"HTTP/1.1 200")
    assert download_reply.endswith(b"\r\n\r\n" + download)
    assert stream.client_identity == identity


# Python ssl


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_python_ssl(matrix: Matrix, key_type: KeyType) -> None:
    identity = matrix.identities[key_type]
    payload = random_bytes(MIB)
    async with serve_python_tls(matrix.cert, matrix.key, matrix.files.ca_path) as peer:
        _, reply = await echo_through(peer.port, matrix, identity, payload)
    assert peer.client_subjects == [((("commonName", f"client {key_type}"),),)]
    assert len(reply) == len(payload)
    assert reply == payload
