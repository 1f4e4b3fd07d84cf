"""The X25519MLKEM768 hybrid group (draft-ietf-tls-ecdhe-mlkem, codepoint
0x11EC): byte-level against the scripted server, then against Go and
Node.js, which support it, and OpenSSL 3.0 and GnuTLS, which do not."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from peers import (
    build_go_server,
    start_gnutls_server,
    start_go_server,
    start_node_server,
    start_openssl_server,
)
from scripted_server import ScriptedServer, encapsulate_hybrid
from test_interop_peers import Files, exchange, make_files, open_tls, split_header
from test_tls_client import expect_alert, new_client, started
from tls_harness import events

from kmsproxy.tls import alerts
from kmsproxy.tls import messages as m
from kmsproxy.tls.client import State
from kmsproxy.tls.events import HandshakeComplete
from kmsproxy.tls.key_exchange import (
    HybridPrivateKey,
    generate_private_key,
    public_key_bytes,
    shared_secret,
)
from kmsproxy.tls.records import ContentType

E = m.ExtensionType
G = m.NamedGroup


def client_shares(server: ScriptedServer) -> list[m.KeyShareEntry]:
    return m.pull_key_share_client(server.client_extension(E.key_share) or b"")


# Byte level


def test_hybrid_share_offered_first() -> None:
    _client, server = started()
    shares = client_shares(server)
    groups = m.pull_uint16_list_extension(
        server.client_extension(E.supported_groups) or b"", "supported_groups", 2
    )
    assert [share.group for share in shares] == [0x11EC, G.x25519]
    # ML-KEM-768 encapsulation key (1184 bytes), then X25519 (32 bytes).
    assert len(shares[0].key_exchange) == 1184 + 32
    assert len(shares[1].key_exchange) == 32
    assert groups == [0x11EC, G.x25519, G.secp256r1, G.secp384r1, G.secp521r1]


def test_hybrid_share_halves_are_keys() -> None:
    _client, server = started()
    share = client_shares(server)[0].key_exchange
    mlkem.MLKEM768PublicKey.from_public_bytes(share[:1184])
    x25519.X25519PublicKey.from_public_bytes(share[1184:])


def test_hybrid_secret_layout() -> None:
    private_key = generate_private_key(G.X25519MLKEM768)
    assert isinstance(private_key, HybridPrivateKey)
    server_share, expected = encapsulate_hybrid(public_key_bytes(private_key))
    assert len(server_share) == 1088 + 32
    secret = shared_secret(G.X25519MLKEM768, private_key, server_share)
    assert len(secret) == 64
    assert secret == expected


def test_hybrid_handshake() -> None:
    client, server = started()
    client.receive_data(server.server_hello() + server.flight())
    assert [type(e) for e in events(client)] == [HandshakeComplete]
    assert client.key_exchange_group == G.X25519MLKEM768


def test_server_picks_x25519() -> None:
    client, server = started()
    message, secret = server.server_hello_message(G.x25519)
    client.receive_data(server.accept_server_hello(message, secret) + server.flight())
    assert client.handshake_complete
    assert client.key_exchange_group == G.x25519


def test_retry_to_p256_drops_hybrid() -> None:
    client, server = started()
    client.receive_data(server.hello_retry_request(G.secp256r1))
    retry = server.read_second_client_hello(client.data_to_send())
    shares = m.pull_key_share_client(
        m.find_extension(retry.extensions, E.key_share) or b""
    )
    assert [share.group for share in shares] == [G.secp256r1]
    client.receive_data(server.server_hello() + server.flight())
    assert client.key_exchange_group == G.secp256r1


def test_retry_for_hybrid_already_shared() -> None:
    client, server = started()
    expect_alert(
        client, server.hello_retry_request(G.X25519MLKEM768), alerts.IllegalParameter
    )


def hybrid_server_hello(server: ScriptedServer, key_exchange: bytes) -> bytes:
    message = server.server_hello_with_share(G.X25519MLKEM768, key_exchange)
    return server.accept_server_hello(message, bytes(64))


@pytest.mark.parametrize("length", [32, 1088, 1088 + 31, 1088 + 33])
def test_hybrid_server_share_wrong_length(length: int) -> None:
    client, server = started()
    wire = hybrid_server_hello(server, b"\x01" * length)
    # The client fails before it derives keys, so its alert is in the clear.
    error = expect_alert(client, wire, alerts.IllegalParameter)
    assert "X25519MLKEM768 share" in str(error)


def test_hybrid_x25519_part_low_order() -> None:
    # The all-zero X25519 point yields an all-zero secret (RFC 7748 section 6.1).
    client, server = started()
    share = client_shares(server)[0].key_exchange
    ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(share[:1184]).encapsulate()[
        1
    ]
    error = expect_alert(
        client,
        hybrid_server_hello(server, ciphertext + bytes(32)),
        alerts.IllegalParameter,
    )
    assert "invalid server key share" in str(error)


def test_hybrid_bad_ciphertext_fails_finished() -> None:
    # ML-KEM's implicit rejection: a flipped ciphertext byte gives another
    # secret, so the server's encrypted flight does not decrypt.
    client, server = started()
    share = client_shares(server)[0].key_exchange
    server_share, secret = encapsulate_hybrid(share)
    tampered = bytes([server_share[0] ^ 1]) + server_share[1:]
    message = server.server_hello_with_share(G.X25519MLKEM768, tampered)
    wire = server.accept_server_hello(message, secret) + server.flight()
    with pytest.raises(alerts.BadRecordMac):
        client.receive_data(wire)
    assert client.state == State.CLOSED
    # The alert goes under the client's own handshake key, which differs
    # from the server's, so only its record type is checked here.
    assert client.data_to_send()[0] == ContentType.application_data


def test_client_hello_fits_one_record() -> None:
    client = new_client(alpn_protocols=["h2", "http/1.1"])
    client.start()
    wire = client.data_to_send()
    # One record: the 1216-byte hybrid share keeps the hello under 2^14.
    assert int.from_bytes(wire[3:5], "big") == len(wire) - 5


# Real peers


@pytest.fixture
def pki(tmp_path: Path) -> Files:
    return make_files(tmp_path)


@pytest.fixture(scope="session")
def go_server_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_go_server(tmp_path_factory.mktemp("go-build"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.interop
@pytest.mark.anyio
async def test_go_negotiates_hybrid(pki: Files, go_server_binary: Path) -> None:
    cert, key = pki.server()
    with start_go_server(
        pki.directory, go_server_binary, cert, key, pki.ca_path
    ) as peer:
        stream = await open_tls(peer.port, pki.config(pki.client()))
        async with stream:
            reply = await exchange(stream, b"hello go\n")
    fields, echoed = split_header(reply)
    assert fields["group"] == "X25519MLKEM768"
    assert stream.connection.key_exchange_group == G.X25519MLKEM768
    assert not stream.connection.hello_retry_requested
    assert echoed == b"hello go\n"


@pytest.mark.interop
@pytest.mark.anyio
async def test_node_negotiates_hybrid(pki: Files) -> None:
    cert, key = pki.server()
    with start_node_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, pki.config(pki.client()))
        async with stream:
            reply = await exchange(stream, b"hello node\n")
    _fields, echoed = split_header(reply)
    assert stream.connection.key_exchange_group == G.X25519MLKEM768
    assert echoed == b"hello node\n"


@pytest.mark.interop
@pytest.mark.anyio
async def test_openssl_30_falls_back_to_x25519(pki: Files) -> None:
    cert, key = pki.server()
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, pki.config(pki.client()))
        async with stream:
            await stream.send(b"GET / HTTP/1.0\r\n\r\n")
            response = await stream.receive()
    assert stream.connection.key_exchange_group == G.x25519
    assert not stream.connection.hello_retry_requested
    assert response.startswith(b"HTTP/1.0 200 ok")


@pytest.mark.interop
@pytest.mark.anyio
async def test_openssl_p256_only_retries(pki: Files) -> None:
    cert, key = pki.server()
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, groups="P-256"
    ) as peer:
        stream = await open_tls(peer.port, pki.config(pki.client()))
        async with stream:
            await stream.send(b"GET / HTTP/1.0\r\n\r\n")
            response = await stream.receive()
    assert stream.connection.hello_retry_requested
    assert stream.connection.key_exchange_group == G.secp256r1
    assert response.startswith(b"HTTP/1.0 200 ok")


@pytest.mark.interop
@pytest.mark.anyio
async def test_gnutls_falls_back(pki: Files) -> None:
    cert, key = pki.server()
    with start_gnutls_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, pki.config(pki.client()))
        async with stream:
            reply = await exchange(stream, b"hello gnutls\n")
    assert stream.connection.key_exchange_group == G.x25519
    assert reply == b"hello gnutls\n"
