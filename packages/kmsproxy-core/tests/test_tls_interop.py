"""Handshakes with client authentication against real TLS 1.3 servers:
`openssl s_server`, nginx and Python's `ssl` module.

Each test performs a handshake, one request or echo, and a close.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import anyio
import pytest
from peers import LOOPBACK, serve_python_tls, start_nginx, start_openssl_server
from pki import KeyType, issue
from tls_peers_pki import (
    MAX_READS,
    Files,
    config,
    make_files,
    open_tls,
    read_to_end,
    s_server_get,
)

from kmsproxy.signer import SignatureScheme, SignerError, SoftwareSigner
from kmsproxy.tls import (
    AlertDescription,
    AlertReceived,
    CertificateVerifyFailed,
    ClientIdentity,
    ConnectionLost,
    HandshakeTimeout,
    SignatureFailed,
)

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

# Time a peer gets to send its alert after our Finished. A local s_server
# replies within milliseconds, so 10 s only guards against a hang.
PEER_REPLY_TIMEOUT_SECONDS = 10.0

# Pause between two stdin commands to s_server, so it reads them separately.
# It polls stdin in a loop, so 0.3 s is ample on an idle machine (estimate).
KEY_UPDATE_GAP_SECONDS = 0.3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pki(tmp_path: Path) -> Files:
    return make_files(tmp_path, "interop CA")


# openssl s_server


@pytest.mark.parametrize(
    "suite",
    [
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    ],
)
async def test_s_server_cipher_suite(pki: Files, suite: str) -> None:
    cert, key = pki.server()
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, ciphersuites=suite
    ) as peer:
        stream, response = await s_server_get(peer, config(pki, [pki.client()]))
    assert stream.cipher_suite == suite
    assert stream.version == "TLSv1.3"
    assert response.startswith(b"HTTP/1.0 200 ok")
    assert suite.encode() in response


@pytest.mark.parametrize("server_key", ["rsa2048", "p256", "p384", "ed25519"])
@pytest.mark.parametrize("client_key", ["p256", "p384", "p521", "rsa2048", "ed25519"])
async def test_s_server_client_key(
    pki: Files, server_key: KeyType, client_key: KeyType
) -> None:
    cert, key = pki.server(server_key)
    identity = pki.client(client_key)
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream, response = await s_server_get(peer, config(pki, [identity]))
    assert stream.client_identity == identity
    # s_server -www prints the client certificate it verified.
    assert f"Subject: CN=client {client_key}\n".encode() in response


async def test_s_server_skips_expired_identity(pki: Files) -> None:
    cert, key = pki.server()
    now = datetime.datetime.now(datetime.UTC)
    expired = issue(
        pki.ca,
        "client expired",
        client=True,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    expired_identity = ClientIdentity(
        tuple(expired.chain), SoftwareSigner(expired.key, "file:expired.key")
    )
    valid_identity = pki.client()
    # The expired identity comes first, as after a failed renewal.
    settings = config(pki, [expired_identity, valid_identity])
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream, response = await s_server_get(peer, settings)
    assert stream.client_identity == valid_identity
    assert b"Subject: CN=client p256\n" in response


# Code points (RFC 8446 section 4.2.7) of the groups that s_server is limited
# to, which the client offers only after a HelloRetryRequest.
HRR_GROUP_CODES = {"P-384": 0x0018, "P-521": 0x0019}


@pytest.mark.parametrize("group", sorted(HRR_GROUP_CODES))
async def test_s_server_hello_retry_request(pki: Files, group: str) -> None:
    cert, key = pki.server()
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, groups=group
    ) as peer:
        stream, response = await s_server_get(peer, config(pki, [pki.client()]))
    assert stream.connection.hello_retry_requested
    assert stream.connection.key_exchange_group == HRR_GROUP_CODES[group]
    assert response.startswith(b"HTTP/1.0 200 ok")


async def test_s_server_rev_echo(pki: Files) -> None:
    cert, key = pki.server("rsa2048")
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, mode="-rev"
    ) as peer:
        stream = await open_tls(peer.port, config(pki, [pki.client("rsa2048")]))
        async with stream:
            await stream.send(b"kmsproxy\n")
            reply = b""
            for _ in range(MAX_READS):
                reply += await stream.receive()
                if reply.endswith(b"\n"):
                    break
    assert reply.strip() == b"yxorpsmk"


async def test_s_server_ip_address_name(pki: Files) -> None:
    cert, key = pki.server()
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream, response = await s_server_get(
            peer, config(pki, [pki.client()], LOOPBACK)
        )
    assert response.startswith(b"HTTP/1.0 200 ok")
    assert stream.peer_chain[0].subject.rfc4514_string() == "CN=server"


async def test_s_server_selects_cert_by_sni(pki: Files) -> None:
    default_cert, default_key = pki.server()
    other = issue(pki.ca, "sni server", dns_names=("sni.test",))
    sni_key, sni_cert = other.write(pki.directory, "sni-server")
    sni_args = [
        "-servername",
        "sni.test",
        "-cert2",
        str(sni_cert),
        "-key2",
        str(sni_key),
    ]
    with start_openssl_server(
        pki.directory, default_cert, default_key, pki.ca_path, extra_args=sni_args
    ) as peer:
        stream, response = await s_server_get(
            peer, config(pki, [pki.client()], "sni.test")
        )
    assert response.startswith(b"HTTP/1.0 200 ok")
    assert stream.peer_chain[0] == other.cert


# nginx


@pytest.mark.parametrize(
    ("server_key", "client_key"),
    [
        ("rsa2048", "p256"),
        ("p256", "rsa2048"),
        ("p256", "ed25519"),
        ("rsa2048", "p384"),
    ],
)
async def test_nginx_sees_subject(
    pki: Files, server_key: KeyType, client_key: KeyType
) -> None:
    cert, key = pki.server(server_key)
    with start_nginx(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(
            peer.port,
            config(pki, [pki.client(client_key)], alpn_protocols=["http/1.1"]),
        )
        async with stream:
            await stream.send(
                b"GET /subject HTTP/1.1\r\nHost: server.test\r\n"
                b"Connection: close\r\n\r\n"
            )
            response = await read_to_end(stream)
        subjects = peer.client_subjects()
    assert response.startswith(b"HTTP/1.1 200")
    assert response.endswith(f"subject=CN=client {client_key}\n".encode())
    assert subjects == [f"CN=client {client_key}"]
    assert stream.alpn_protocol == "http/1.1"


# Python's ssl module


async def test_python_ssl_echo(pki: Files) -> None:
    cert, key = pki.server("rsa2048")
    async with serve_python_tls(
        cert, key, pki.ca_path, alpn_protocols=["http/1.1"]
    ) as peer:
        settings = config(pki, [pki.client("p384")], alpn_protocols=["h2", "http/1.1"])
        stream = await open_tls(peer.port, settings)
        async with stream:
            await stream.send(b"hello")
            echoed = await stream.receive()
            await stream.send_eof()
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
    assert echoed == b"hello"
    assert stream.alpn_protocol == "http/1.1"
    assert peer.client_subjects == [((("commonName", "client p384"),),)]


async def test_python_ssl_large_echo(pki: Files) -> None:
    cert, key = pki.server()
    payload = bytes(range(256)) * 400
    async with serve_python_tls(cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, config(pki, [pki.client("ed25519")]))
        async with stream:
            await stream.send(payload)
            echoed = b""
            for _ in range(MAX_READS):
                if len(echoed) >= len(payload):
                    break
                echoed += await stream.receive()
    assert echoed == payload


async def test_python_ssl_concurrent_relay(pki: Files) -> None:
    cert, key = pki.server()
    chunk = bytes(range(256)) * 16
    count = 64
    received = bytearray()
    async with serve_python_tls(cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, config(pki, [pki.client()]))

        async def send_all() -> None:
            for _ in range(count):
                await stream.send(chunk)

        async def receive_all() -> None:
            for _ in range(MAX_READS):
                if len(received) >= count * len(chunk):
                    return
                received.extend(await stream.receive())

        async with stream:
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(send_all)
                    tasks.start_soon(receive_all)
    assert bytes(received) == chunk * count


async def test_python_ssl_server_closes(pki: Files) -> None:
    cert, key = pki.server()
    async with serve_python_tls(cert, key, pki.ca_path, echo_limit=1) as peer:
        stream = await open_tls(peer.port, config(pki, [pki.client()]))
        async with stream:
            await stream.send(b"once")
            echoed = await stream.receive()
            with (
                anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS),
                pytest.raises(anyio.EndOfStream),
            ):
                await stream.receive()
    assert echoed == b"once"


async def test_truncation_raises(pki: Files) -> None:
    cert, key = pki.server()
    async with serve_python_tls(
        cert, key, pki.ca_path, echo_limit=1, close_notify=False
    ) as peer:
        stream = await open_tls(peer.port, config(pki, [pki.client()]))
        async with stream:
            await stream.send(b"once")
            echoed = await stream.receive()
            with (
                anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS),
                pytest.raises(ConnectionLost, match="without close_notify"),
            ):
                await stream.receive()
    assert echoed == b"once"


async def test_stream_passes_socket_attributes(pki: Files) -> None:
    cert, key = pki.server()
    async with serve_python_tls(cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, config(pki, [pki.client()]))
        async with stream:
            remote = stream.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610
    assert remote == (LOOPBACK, peer.port)


# Server verification failures


async def test_wrong_name(pki: Files) -> None:
    cert, key = pki.server()
    with (
        start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer,
        pytest.raises(CertificateVerifyFailed) as caught,
    ):
        await open_tls(peer.port, config(pki, [pki.client()], "other.test"))
    assert caught.value.description == AlertDescription.bad_certificate
    assert (
        str(caught.value)
        == "certificate for 'server.test', '127.0.0.1' does not match 'other.test'"
    )


async def test_untrusted_ca(pki: Files, tmp_path: Path) -> None:
    other = make_files(tmp_path, "other CA")
    cert, key = other.server()
    with (
        start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer,
        pytest.raises(CertificateVerifyFailed) as caught,
    ):
        await open_tls(peer.port, config(pki, [pki.client()]))
    assert caught.value.description == AlertDescription.unknown_ca
    assert "certificate not trusted: issuer 'CN=other CA" in str(caught.value)


async def test_expired_certificate(pki: Files) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert, key = pki.server(
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )
    with (
        start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer,
        pytest.raises(CertificateVerifyFailed) as caught,
    ):
        await open_tls(peer.port, config(pki, [pki.client()]))
    assert caught.value.description == AlertDescription.certificate_expired
    assert "expired" in str(caught.value)


# Client authentication failures


async def test_identity_from_unknown_ca(pki: Files, tmp_path: Path) -> None:
    other = make_files(tmp_path, "other CA")
    cert, key = pki.server()
    # Without -verify_return_error, s_server logs the failure and goes on.
    with start_openssl_server(
        pki.directory,
        cert,
        key,
        other.ca_path,
        extra_args=["-verify_return_error"],
    ) as peer:
        stream = await open_tls(peer.port, config(pki, [pki.client()]))
        async with stream:
            with (
                anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS),
                pytest.raises(AlertReceived) as caught,
            ):
                await stream.receive()
    assert caught.value.description == AlertDescription.unknown_ca
    assert str(caught.value) == "server sent alert unknown_ca (48)"


async def test_no_identity(pki: Files) -> None:
    cert, key = pki.server()
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, config(pki, []))
        async with stream:
            with (
                anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS),
                pytest.raises(AlertReceived) as caught,
            ):
                await stream.receive()
    assert stream.client_identity is None
    assert caught.value.description == AlertDescription.certificate_required


class BrokenSigner(SoftwareSigner):
    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        raise SignerError(f"{self.uri}: token removed")


async def test_signer_failure(pki: Files) -> None:
    cert, key = pki.server()
    working = pki.client()
    broken = ClientIdentity(
        working.chain, BrokenSigner(issue(pki.ca, "x").key, "pkcs11:token=gone")
    )
    with (
        start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer,
        pytest.raises(SignatureFailed, match="pkcs11:token=gone") as caught,
    ):
        await open_tls(peer.port, config(pki, [broken]))
    assert isinstance(caught.value.__cause__, SignerError)
    assert caught.value.description == AlertDescription.internal_error


async def test_handshake_timeout(pki: Files) -> None:
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610

    async def swallow(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep(30)

    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, swallow)
        with pytest.raises(HandshakeTimeout, match=r"timed out after 0\.5 s"):
            await open_tls(port, config(pki, [], handshake_timeout=0.5))
        tasks.cancel_scope.cancel()


async def test_s_server_key_update(pki: Files) -> None:
    cert, key = pki.server()
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, interactive=True
    ) as peer:
        stream = await open_tls(peer.port, config(pki, [pki.client()]))
        async with stream:
            # s_server reads one stdin line per command, so "K" (KeyUpdate,
            # update_requested) and the data go in separate writes.
            peer.write_stdin(b"K\n")
            await anyio.sleep(KEY_UPDATE_GAP_SECONDS)
            peer.write_stdin(b"after update\n")
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                received = await stream.receive()
            await stream.send(b"client after update\n")
            logged = peer.wait_for_log("client after update")
    assert received == b"after update\n"
    assert stream.connection.key_updates_received == 1
    assert logged
