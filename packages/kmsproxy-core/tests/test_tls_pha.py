"""Post-handshake client authentication (RFC 8446 section 4.6.2): byte-level
against the scripted server, then against `openssl s_server`, whose `c`
command requests a certificate after the handshake, and Apache httpd, which
requests one for a protected location only."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from peers import Peer, start_apache, start_openssl_server
from pki import issue, make_ca
from scripted_server import ScriptedServer, complete_handshake
from test_tls_client import expect_alert, identity
from tls_harness import events
from tls_peers_pki import SERVER_NAME, Files, config, make_files, open_tls

from kmsproxy.metrics import metrics
from kmsproxy.signer import SignatureScheme, sign_with_private_key, verify_signature
from kmsproxy.tls import TLSClientStream, alerts
from kmsproxy.tls import messages as m
from kmsproxy.tls.client import ClientConnection
from kmsproxy.tls.config import ClientIdentity, TLSClientConfig
from kmsproxy.tls.events import ApplicationData, SignatureRequested
from kmsproxy.tls.key_schedule import Transcript, finished_verify_data
from kmsproxy.tls.records import ContentType
from kmsproxy.tls.verify import CLIENT_CONTEXT, signed_content

CA = make_ca("pha CA")
SERVER = issue(CA, "server", dns_names=("server.test",))
CLIENT = issue(CA, "client", client=True)

E = m.ExtensionType

# Pause between a stdin command to s_server and the next step, so s_server
# reads it on its own. It polls stdin in a loop, so 0.3 s is ample on an
# idle machine (an estimate).
STDIN_GAP_SECONDS = 0.3

# Time to wait for s_server's reply after a request. A local s_server
# replies within milliseconds, so 10 s only guards against a hang.
PEER_REPLY_TIMEOUT_SECONDS = 10.0

# Delay between reads of Apache's access log while waiting for a line.
ACCESS_LOG_POLL_SECONDS = 0.02


def connected(
    identities: list[ClientIdentity],
) -> tuple[ClientConnection, ScriptedServer, Transcript]:
    """Complete a handshake without a CertificateRequest; return the
    server's transcript through the client Finished."""
    client = ClientConnection(TLSClientConfig("server.test", identities=identities))
    server = ScriptedServer(SERVER)
    records = complete_handshake(client, server)
    events(client)
    transcript = server.transcript.copy()
    transcript.add(records[-1][1])
    return client, server, transcript


def certificate_request(
    context: bytes = b"\x07", schemes: list[int] | None = None
) -> bytes:
    schemes = schemes or [SignatureScheme.ecdsa_secp256r1_sha256]
    extensions: list[m.Extension] = [
        (E.signature_algorithms, m.push_uint16_list_extension(schemes))
    ]
    return m.push_certificate_request(m.CertificateRequest(context, extensions))


def split_handshake(data: bytes) -> list[bytes]:
    messages = []
    for _ in range(10):
        if not data:
            break
        end = 4 + int.from_bytes(data[1:4], "big")
        messages.append(data[:end])
        data = data[end:]
    return messages


def test_offers_post_handshake_auth() -> None:
    client = ClientConnection(
        TLSClientConfig("server.test", identities=[identity(CLIENT)])
    )
    server = ScriptedServer(SERVER)
    client.start()
    server.read_client_hello(client.data_to_send())
    assert server.client_extension(E.post_handshake_auth) == b""


def test_request_asks_for_signature() -> None:
    client, server, transcript = connected([identity(CLIENT)])
    request = certificate_request()
    client.receive_data(server.protect(ContentType.handshake, request))
    found = events(client)
    assert len(found) == 1
    event = found[0]
    assert isinstance(event, SignatureRequested)
    assert event.scheme == SignatureScheme.ecdsa_secp256r1_sha256
    # Nothing leaves before the signature: Certificate waits for it.
    assert client.data_to_send() == b""
    transcript.add(request)
    transcript.add(
        m.push_certificate(
            m.Certificate(
                b"\x07", [m.CertificateEntry(CLIENT.cert.public_bytes(Encoding.DER))]
            )
        )
    )
    assert event.content == signed_content(CLIENT_CONTEXT, transcript.digest())


def test_flight_verifies() -> None:
    client, server, transcript = connected([identity(CLIENT)])
    request = certificate_request()
    client.receive_data(server.protect(ContentType.handshake, request))
    event = events(client)[0]
    assert isinstance(event, SignatureRequested)
    client.provide_signature(
        sign_with_private_key(CLIENT.key, event.content, event.scheme)
    )
    records = server.read_client_records(client.data_to_send())
    assert [content_type for content_type, _ in records] == [ContentType.handshake]
    certificate, verify, finished = split_handshake(records[0][1])

    parsed = m.pull_certificate(certificate[4:])
    assert parsed.certificate_request_context == b"\x07"
    assert [e.cert_data for e in parsed.certificate_list] == [
        CLIENT.cert.public_bytes(Encoding.DER)
    ]
    transcript.add(request)
    transcript.add(certificate)
    cv = m.pull_certificate_verify(verify[4:])
    verify_signature(
        CLIENT.key.public_key(),
        cv.signature,
        signed_content(CLIENT_CONTEXT, transcript.digest()),
        SignatureScheme(cv.algorithm),
    )
    transcript.add(verify)
    expected = finished_verify_data(
        server.suite, server.application_secrets[0], transcript.digest()
    )
    assert finished[4:] == expected
    assert client.client_identity is not None
    assert client.post_handshake_authentications == 1


def test_data_flows_while_signing() -> None:
    client, server, _ = connected([identity(CLIENT)])
    wire = server.protect(ContentType.handshake, certificate_request())
    wire += server.protect(ContentType.application_data, b"server data")
    client.receive_data(wire)
    found = events(client)
    assert isinstance(found[0], SignatureRequested)
    assert found[1:] == [ApplicationData(b"server data")]
    client.send_application_data(b"client data")
    records = server.read_client_records(client.data_to_send())
    assert records == [(ContentType.application_data, b"client data")]


def test_two_requests_answered_in_order() -> None:
    client, server, _ = connected([identity(CLIENT)])
    wire = server.protect(ContentType.handshake, certificate_request(b"\x01"))
    wire += server.protect(ContentType.handshake, certificate_request(b"\x02"))
    client.receive_data(wire)
    requests = events(client)
    assert len(requests) == 2
    contexts = []
    for event in requests:
        assert isinstance(event, SignatureRequested)
        client.provide_signature(
            sign_with_private_key(CLIENT.key, event.content, event.scheme)
        )
        records = server.read_client_records(client.data_to_send())
        certificate = split_handshake(records[0][1])[0]
        contexts.append(m.pull_certificate(certificate[4:]).certificate_request_context)
    assert contexts == [b"\x01", b"\x02"]
    assert client.post_handshake_authentications == 2


def test_no_usable_identity_sends_empty_certificate() -> None:
    client, server, transcript = connected([identity(CLIENT)])
    request = certificate_request(schemes=[SignatureScheme.rsa_pss_rsae_sha256])
    client.receive_data(server.protect(ContentType.handshake, request))
    assert events(client) == []
    records = server.read_client_records(client.data_to_send())
    certificate, finished = split_handshake(records[0][1])
    assert m.pull_certificate(certificate[4:]).certificate_list == []
    transcript.add(request)
    transcript.add(certificate)
    expected = finished_verify_data(
        server.suite, server.application_secrets[0], transcript.digest()
    )
    assert finished[4:] == expected
    assert client.client_identity is None


def test_request_without_signature_algorithms() -> None:
    client, server, _ = connected([identity(CLIENT)])
    request = m.push_certificate_request(
        m.CertificateRequest(b"\x01", [(E.status_request, b"")])
    )
    expect_alert(
        client,
        server.protect(ContentType.handshake, request),
        alerts.MissingExtension,
        server,
    )


def test_truncated_request() -> None:
    client, server, _ = connected([identity(CLIENT)])
    request = certificate_request()
    broken = bytes([request[0]]) + (len(request) - 5).to_bytes(3, "big") + request[4:-1]
    expect_alert(
        client,
        server.protect(ContentType.handshake, broken),
        alerts.DecodeError,
        server,
    )


# openssl s_server


@pytest.fixture
def pki(tmp_path: Path) -> Files:
    return make_files(tmp_path, "pha interop CA")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.interop
@pytest.mark.anyio
async def test_s_server_requests_after_handshake(pki: Files) -> None:
    cert, key = pki.server()
    client = pki.client()
    extra = ["-CAfile", str(pki.ca_path)]
    with start_openssl_server(
        pki.directory, cert, key, None, interactive=True, extra_args=extra
    ) as peer:
        stream = await open_tls(peer.port, config(pki, [client]))
        async with stream:
            assert stream.client_identity is None
            await stream.send(b"before\n")
            assert peer.wait_for_log("before")
            peer.write_stdin(b"c\n")
            time.sleep(STDIN_GAP_SECONDS)
            peer.write_stdin(b"from server\n")
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                reply = await stream.receive()
            await stream.send(b"after\n")
            # s_server prints data only from a connection it still trusts.
            assert peer.wait_for_log("after")
        log = peer.log()
    assert reply == b"from server\n"
    assert stream.client_identity == client
    assert stream.connection.post_handshake_authentications == 1
    assert "depth=0 CN = client p256" in log
    assert "verify error" not in log


# Apache httpd: SSLVerifyClient require inside one <Location>

# Bytes POSTed to the protected echo: many records, sent while the
# certificate exchange runs.
LARGE_BODY_LENGTH = 1024 * 1024

# Bound on receive() calls while reading one HTTP response.
MAX_READS = 10_000


async def read_response(stream: TLSClientStream) -> tuple[bytes, bytes]:
    """Read one HTTP/1.1 response with Content-Length; return (head, body)."""
    data = b""
    for _ in range(MAX_READS):
        head, found, body = data.partition(b"\r\n\r\n")
        if found:
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(body) >= length:
                return head, body
        data += await stream.receive()
    raise AssertionError(f"no complete response after {MAX_READS} reads")


def keep_alive_get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\n\r\n".encode()


def wait_for_access_lines(peer: Peer, count: int) -> list[str]:
    """Return the access log once it has `count` lines, or as it is after
    PEER_REPLY_TIMEOUT_SECONDS. Apache writes a line after it sends the
    response, so the client can read the response before the line exists."""
    deadline = time.monotonic() + PEER_REPLY_TIMEOUT_SECONDS
    while len(peer.access_log()) < count and time.monotonic() < deadline:
        time.sleep(ACCESS_LOG_POLL_SECONDS)
    return peer.access_log()


@pytest.mark.interop
@pytest.mark.anyio
async def test_apache_open_then_protected(pki: Files) -> None:
    cert, key = pki.server()
    client = pki.client()
    before = metrics.snapshot()
    with start_apache(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, config(pki, [client]))
        async with stream:
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                await stream.send(keep_alive_get("/open"))
                open_head, open_body = await read_response(stream)
                identity_after_open = stream.client_identity
                await stream.send(keep_alive_get("/protected/page"))
                protected_head, protected_body = await read_response(stream)
        access = wait_for_access_lines(peer, 2)
    after = metrics.snapshot()
    assert open_head.startswith(b"HTTP/1.1 200")
    assert open_body == b"open\n"
    assert identity_after_open is None
    assert protected_head.startswith(b"HTTP/1.1 200")
    assert protected_body == b"protected\n"
    assert stream.client_identity == client
    assert after.signer_calls - before.signer_calls == 1
    assert access == [
        "-|GET /open HTTP/1.1|200",
        "CN=client p256|GET /protected/page HTTP/1.1|200",
    ]


@pytest.mark.interop
@pytest.mark.anyio
async def test_apache_protected_large_post(pki: Files) -> None:
    # The proxy relays both directions at once, so this test does too: one
    # task writes the body while another reads and responds to Apache's
    # CertificateRequest. NOTE: start_apache sets SSLRenegBufferSize to
    # 2 MiB, so Apache reads the whole body first and this test does not
    # show whether a server that stops reading could deadlock us.
    cert, key = pki.server()
    body = os.urandom(LARGE_BODY_LENGTH)
    request = (
        f"POST /protected/echo HTTP/1.1\r\nHost: {SERVER_NAME}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    heads: list[bytes] = []
    with start_apache(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, config(pki, [pki.client()]))
        async with stream:

            async def receive_head() -> None:
                heads.append(await stream.receive())

            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(receive_head)
                    await stream.send(request)
        subjects = peer.client_subjects()
    assert heads[0].startswith(b"HTTP/1.1 200")
    assert subjects == ["CN=client p256"]
