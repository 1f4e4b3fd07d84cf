"""The wait for a TLS 1.3 server to reject our client certificate.

After a full TLS 1.3 handshake the server checks our certificate only once
its own Finished is sent, so a rejection comes as an alert afterwards. The
stream's `client_certificate_pending` is True while that can still happen,
and `receive_after_handshake` returns as soon as the server sends anything.
The proxy waits for that within bounds, and a rejection after the wait
still reaches an HTTP/1.1 client as a 502 page.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from anyio.streams.tls import TLSStream
from peers import LOOPBACK, Peer, PythonPeer, serve_python_tls, start_openssl_server
from pki import issue, make_ca
from proxy_site import (
    REQUEST_TIMEOUT_SECONDS,
    Site,
    curl,
    nginx,
    proxy_address,
    running,
    site,
)
from scripted_server import ScriptedServer
from test_tls_client import SERVER, new_client

from kmsproxy import Proxy, ProxyAddresses
from kmsproxy.proxy import tunnel
from kmsproxy.signer import SignatureScheme, SoftwareSigner, sign_with_private_key
from kmsproxy.tls import (
    AlertDescription,
    AlertReceived,
    ClientIdentity,
    TLSClientConfig,
    TLSClientStream,
    TrustStore,
    connect_tls,
)
from kmsproxy.tls import messages as m
from kmsproxy.tls.alerts import BadRecordMac
from kmsproxy.tls.events import SignatureRequested
from kmsproxy.tls.records import ContentType

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

__all__ = ["nginx", "running", "site"]

# Bounds a wait for a loopback peer, which replies within milliseconds.
PEER_REPLY_TIMEOUT_SECONDS = 10.0

# Pause between two looks at the proxy's counters.
POLL_SECONDS = 0.01

# How long a silent server is watched to show that nothing ends the wait.
SILENCE_SECONDS = 0.2

# A rejection wait far longer than any request below may take: a request
# that completes shows that something other than the bound ended the wait.
LONG_WAIT_SECONDS = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client_config(site: Site) -> TLSClientConfig:
    signer = SoftwareSigner(site.client.key, "file:client.key")
    return TLSClientConfig(
        "localhost",
        [ClientIdentity(tuple(site.client.chain), signer)],
        TrustStore.load([site.path("upstream-ca.crt")], include_system=False),
    )


async def open_stream(site: Site, port: int) -> TLSClientStream:
    transport = await anyio.connect_tcp(LOOPBACK, port)
    try:
        with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
            return await connect_tls(transport, client_config(site))
    except BaseException:
        await transport.aclose()
        raise


def python_server(
    site: Site, client_ca: Path | None, **options: Any
) -> contextlib.AbstractAsyncContextManager[PythonPeer]:
    """Serve Python's `ssl` echo server with the site's upstream leaf."""
    return serve_python_tls(
        site.path("server.crt"), site.path("server.key"), client_ca, **options
    )


async def fetch_through(addresses: ProxyAddresses, site: Site, url: str) -> bytes:
    """Fetch `url` with curl through the proxy; return the body and status."""
    result = await curl(
        "--proxy",
        addresses.proxy_url,
        "--cacert",
        str(site.path("ca.crt")),
        "--write-out",
        "status=%{http_code}",
        url,
    )
    return result.stdout


async def test_ticket_confirms_certificate(site: Site) -> None:
    async with python_server(site, site.path("client-ca.crt")) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            pending_after_handshake = stream.client_certificate_pending
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                data = await stream.receive_after_handshake()
            pending_after_ticket = stream.client_certificate_pending
    assert pending_after_handshake
    assert data == b""
    assert not pending_after_ticket


async def test_silent_server_keeps_certificate_pending(site: Site) -> None:
    async with python_server(site, site.path("client-ca.crt"), num_tickets=0) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            with anyio.move_on_after(SILENCE_SECONDS) as silence:
                await stream.receive_after_handshake()
            pending_while_silent = stream.client_certificate_pending
            await stream.send(b"ping")
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                echoed = await stream.receive_after_handshake()
            pending_after_data = stream.client_certificate_pending
    assert silence.cancelled_caught
    assert pending_while_silent
    assert echoed == b"ping"
    assert not pending_after_data


async def test_no_certificate_request_is_not_pending(site: Site) -> None:
    async with python_server(site, None, num_tickets=0) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            pending = stream.client_certificate_pending
    assert not pending


async def test_tls12_is_not_pending(site: Site) -> None:
    async with python_server(
        site, site.path("client-ca.crt"), maximum_version=ssl.TLSVersion.TLSv1_2
    ) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            version = stream.version
            pending = stream.client_certificate_pending
    assert version == "TLSv1.2"
    assert not pending


async def test_rejection_raises_after_handshake(site: Site) -> None:
    other_ca = site.path("other-ca.crt")
    other_ca.write_bytes(make_ca("other client CA").chain_pem())
    with start_openssl_server(
        site.directory,
        site.path("server.crt"),
        site.path("server.key"),
        other_ca,
        extra_args=["-verify_return_error"],
    ) as peer:
        stream = await open_stream(site, peer.port)
        async with stream:
            with (
                anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS),
                pytest.raises(AlertReceived) as caught,
            ):
                await stream.receive_after_handshake()
    assert caught.value.description == AlertDescription.unknown_ca


def fix_rejection_wait(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    monkeypatch.setattr(tunnel, "REJECTION_WAIT_MIN_SECONDS", seconds)
    monkeypatch.setattr(tunnel, "REJECTION_WAIT_MAX_SECONDS", seconds)


async def test_proxy_wait_ends_at_ticket(
    site: Site,
    nginx: Peer,
    running: tuple[Proxy, ProxyAddresses],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # nginx requests a client certificate and sends session tickets.
    fix_rejection_wait(monkeypatch, LONG_WAIT_SECONDS)
    _, addresses = running
    with anyio.fail_after(LONG_WAIT_SECONDS / 2):
        output = await fetch_through(
            addresses, site, f"https://localhost:{nginx.port}/subject"
        )
    assert output.endswith(b"status=200")


async def test_late_rejection_is_502_page(
    site: Site,
    running: tuple[Proxy, ProxyAddresses],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No wait at all: the alert reaches the proxy only while it relays.
    fix_rejection_wait(monkeypatch, 0.0)
    proxy, addresses = running
    other_ca = site.path("other-ca.crt")
    other_ca.write_bytes(make_ca("other client CA").chain_pem())
    with start_openssl_server(
        site.directory,
        site.path("server.crt"),
        site.path("server.key"),
        other_ca,
        extra_args=["-verify_return_error"],
    ) as peer:
        output = await fetch_through(addresses, site, f"https://localhost:{peer.port}/")
    assert b"server rejected our certificate" in output
    assert b"unknown_ca" in output
    assert output.endswith(b"status=502")
    # The page came through the relay, under the upstream's minted leaf.
    assert proxy.minter is not None
    assert proxy.minter.mint_count == 1
    assert await tunnels_failed(proxy) == 1


async def tunnels_failed(proxy: Proxy) -> int:
    """Return the failed tunnel count once no tunnel is open."""
    with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
        while proxy.counts().tunnels.open:
            await anyio.sleep(POLL_SECONDS)
    return proxy.counts().tunnels.failed


# The states of one connection, without a network: the scripted server
# requests a certificate and the client, which has none, replies with an
# empty Certificate, which the server could still reject.


class Replay(anyio.abc.ByteStream):
    """A transport that returns the given reads, then the end of stream."""

    def __init__(self, *reads: bytes, send_delay: float = 0.0) -> None:
        self.reads = list(reads)
        self.sent: list[bytes] = []
        self.send_delay = send_delay
        # A delay before each read that a cancellation does not cut short,
        # as a read already under way in the kernel.
        self.receive_delay = 0.0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        # A socket's receive is a checkpoint, where a cancellation arrives.
        await anyio.lowlevel.checkpoint()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(self.receive_delay)
        if not self.reads:
            raise anyio.EndOfStream
        return self.reads.pop(0)

    async def send(self, item: bytes) -> None:
        await anyio.sleep(self.send_delay)
        self.sent.append(item)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def pending_connection() -> tuple[TLSClientStream, ScriptedServer, Replay]:
    client = new_client()
    server = ScriptedServer(SERVER)
    client.start()
    server.read_client_hello(client.data_to_send())
    client.receive_data(server.server_hello() + server.flight(request_certificate=True))
    client.data_to_send()
    transport = Replay()
    return TLSClientStream(transport, client), server, transport


async def test_key_update_keeps_certificate_pending() -> None:
    # RFC 8446 section 4.6.3: a KeyUpdate may follow the server's own
    # Finished at once, before the server has read our flight.
    stream, server, _ = pending_connection()
    update = m.push_key_update(m.KeyUpdate(m.KeyUpdateRequest.update_not_requested))
    stream.connection.receive_data(server.protect(ContentType.handshake, update))
    assert stream.client_certificate_pending


async def test_ticket_message_ends_pending() -> None:
    stream, server, _ = pending_connection()
    ticket = m.push_new_session_ticket(m.NewSessionTicket(60, 1, b"n", b"t"))
    stream.connection.receive_data(server.protect(ContentType.handshake, ticket))
    assert not stream.client_certificate_pending


def late_alert(description: AlertDescription) -> tuple[TLSClientStream, Replay]:
    stream, server, transport = pending_connection()
    alert = server.protect(ContentType.alert, bytes([2, description]))
    transport.reads.append(alert)
    return stream, transport


async def test_guard_pages_any_late_alert() -> None:
    stream, transport = late_alert(AlertDescription.decrypt_error)
    guard = tunnel._RejectionGuard(stream, "server.test:443", page=True)
    page = await guard.receive()
    await guard.send(b"rest of the request body")
    with pytest.raises(anyio.EndOfStream):
        await guard.receive()
    assert page.startswith(b"HTTP/1.1 502 ")
    assert b"decrypt_error" in page
    assert guard.rejected
    assert transport.sent == []


async def test_guard_without_page_raises() -> None:
    stream, _ = late_alert(AlertDescription.certificate_required)
    guard = tunnel._RejectionGuard(stream, "server.test:443", page=False)
    with pytest.raises(AlertReceived):
        await guard.receive()
    assert guard.rejected


async def echo_through(
    addresses: ProxyAddresses, site: Site, port: int, data: bytes
) -> bytes:
    """Tunnel to an echo server on `port`, send `data`, return the echo."""
    context = ssl.create_default_context(cafile=str(site.path("ca.crt")))
    request = f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        async with await anyio.connect_tcp(*proxy_address(addresses)) as stream:
            await stream.send(request.encode())
            head = await stream.receive()
            assert head.startswith(b"HTTP/1.1 200"), head
            tls = await TLSStream.wrap(
                stream, hostname="localhost", ssl_context=context
            )
            await tls.send(data)
            return await tls.receive()


async def test_proxy_waits_for_silent_server(
    site: Site,
    running: tuple[Proxy, ProxyAddresses],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=tunnel.__name__)
    _, addresses = running
    async with python_server(site, site.path("client-ca.crt"), num_tickets=0) as peer:
        echoed = await echo_through(addresses, site, peer.port, b"ping")
    outcomes = [
        r.getMessage()
        for r in caplog.records
        if "Rejection wait ended" in r.getMessage()
    ]
    assert echoed == b"ping"
    assert len(outcomes) == 1
    assert "outcome=timeout" in outcomes[0]


# A wait much shorter than `SLOW_SECONDS`: it ends in the middle of work
# that takes that long.
SHORT_WAIT_SECONDS = 0.01
SLOW_SECONDS = 0.2

CLIENT = issue(make_ca("rejection wait client CA"), "client", client=True)


class SlowSigner(SoftwareSigner):
    """A software key that takes `SLOW_SECONDS` per signature, as a device may."""

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        await anyio.sleep(SLOW_SECONDS)
        return await super().sign(data, scheme)


async def test_request_during_wait_is_answered() -> None:
    # The server requests a certificate again right after the handshake,
    # and the signature outlasts the wait.
    identity = ClientIdentity(tuple(CLIENT.chain), SlowSigner(CLIENT.key, "file:slow"))
    client = new_client(identities=[identity])
    server = ScriptedServer(SERVER)
    client.start()
    server.read_client_hello(client.data_to_send())
    client.receive_data(server.server_hello() + server.flight(request_certificate=True))
    request = client.next_event()
    assert isinstance(request, SignatureRequested)
    client.provide_signature(
        sign_with_private_key(CLIENT.key, request.content, request.scheme)
    )
    client.data_to_send()
    extensions: list[m.Extension] = [
        (
            m.ExtensionType.signature_algorithms,
            m.push_uint16_list_extension([SignatureScheme.ecdsa_secp256r1_sha256]),
        )
    ]
    again = m.push_certificate_request(m.CertificateRequest(b"\x01", extensions))
    transport = Replay(server.protect(ContentType.handshake, again))
    stream = TLSClientStream(transport, client)
    with anyio.move_on_after(SHORT_WAIT_SECONDS) as wait:
        await stream.receive_after_handshake()
    assert wait.cancelled_caught
    # Certificate, CertificateVerify and Finished went out in one send.
    assert len(transport.sent) == 1


async def test_failure_outlasting_wait_raises() -> None:
    # The tampered record arrives after the wait's deadline has passed, so
    # our alert for it is sent under a cancelled scope.
    stream, server, transport = pending_connection()
    record = bytearray(server.protect(ContentType.application_data, b"data"))
    record[-1] ^= 1
    transport.reads.append(bytes(record))
    transport.receive_delay = SLOW_SECONDS
    with pytest.raises(BadRecordMac), anyio.move_on_after(SHORT_WAIT_SECONDS):
        await stream.receive_after_handshake()


async def test_lost_connection_named_once() -> None:
    stream, _, _ = pending_connection()
    with pytest.raises(tunnel.UpstreamError) as raised:
        await tunnel._wait_for_rejection(stream, PEER_REPLY_TIMEOUT_SECONDS)
    message = str(raised.value)
    assert message.count("after the handshake") == 1
    assert "without close_notify" in message


async def test_relay_logs_upstream_alert(caplog: pytest.LogCaptureFixture) -> None:
    # A ticket ends the wait, and the server rejects us afterwards anyway.
    stream, server, transport = pending_connection()
    ticket = m.push_new_session_ticket(m.NewSessionTicket(60, 1, b"n", b"t"))
    alert = bytes([2, AlertDescription.certificate_unknown])
    transport.reads.append(
        server.protect(ContentType.handshake, ticket)
        + server.protect(ContentType.alert, alert)
    )
    caplog.set_level(logging.WARNING, logger=tunnel.__name__)
    with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
        await tunnel.relay(Replay(), stream, PEER_REPLY_TIMEOUT_SECONDS)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "Upstream failed" in warnings[0]
    assert "certificate_unknown" in warnings[0]
