"""Session resumption (RFC 8446 sections 2.2 and 4.6.1): the SessionCache on
its own, and repeat connections to real servers that must cost no signature."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from peers import (
    build_go_server,
    serve_python_tls,
    start_gnutls_server,
    start_go_server,
    start_node_server,
    start_openssl_server,
)
from pki import issue, make_ca
from scripted_server import ScriptedServer, complete_handshake
from test_interop_peers import Files as PeerFiles
from test_interop_peers import exchange, split_header
from test_interop_peers import make_files as make_peer_files
from test_interop_peers import open_tls as open_peer_tls
from test_tls_client import identity as scripted_identity
from tls_harness import events as client_events
from tls_peers_pki import Files, config, make_files, open_tls, s_server_get

from kmsproxy.metrics import metrics
from kmsproxy.signer import PublicKey, SignatureScheme, Signer
from kmsproxy.tls import ClientIdentity, SessionCache, SessionTicket, alerts
from kmsproxy.tls import key_schedule as ks
from kmsproxy.tls import messages as m
from kmsproxy.tls.alerts import AlertDescription
from kmsproxy.tls.client import ClientConnection
from kmsproxy.tls.config import TLSClientConfig
from kmsproxy.tls.events import HandshakeComplete
from kmsproxy.tls.key_schedule import CipherSuite
from kmsproxy.tls.records import ContentType
from kmsproxy.tls.resumption import ticket_from_message

pytestmark = pytest.mark.anyio

E = m.ExtensionType
G = m.NamedGroup

# Connections the signature-count proof makes to one upstream.
SEQUENTIAL_CONNECTIONS = 50


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pki(tmp_path: Path) -> Files:
    return make_files(tmp_path, "resumption CA")


class CountingSigner(Signer):
    """A Signer that counts its calls and delegates to another."""

    def __init__(self, inner: Signer) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def uri(self) -> str:
        return self.inner.uri

    def public_key(self) -> PublicKey:
        return self.inner.public_key()

    @property
    def schemes(self) -> Sequence[SignatureScheme]:
        return self.inner.schemes

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        self.calls += 1
        return await self.inner.sign(data, scheme)


def counting_identity(
    files: Files | PeerFiles,
) -> tuple[ClientIdentity, CountingSigner]:
    identity = files.client()
    signer = CountingSigner(identity.signer)
    return ClientIdentity(identity.chain, signer), signer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ticket(
    name: bytes, received_at: float = 1000.0, lifetime: float = 60
) -> SessionTicket:
    return SessionTicket(
        ticket=name,
        psk=bytes(32),
        cipher_suite=CipherSuite.TLS_AES_128_GCM_SHA256,
        ticket_age_add=0,
        lifetime=lifetime,
        received_at=received_at,
    )


# SessionCache


def test_cache_takes_newest_once() -> None:
    cache = SessionCache(clock=FakeClock())
    cache.put("a", ticket(b"old"))
    cache.put("a", ticket(b"new"))
    first = cache.take("a")
    second = cache.take("a")
    assert first is not None
    assert first.ticket == b"new"
    assert second is not None
    assert second.ticket == b"old"
    assert cache.take("a") is None


def test_cache_drops_expired() -> None:
    clock = FakeClock()
    cache = SessionCache(clock=clock)
    cache.put("a", ticket(b"t", lifetime=60))
    clock.now += 60
    assert cache.take("a") is None
    assert len(cache) == 0


def test_cache_bounds_tickets_per_key() -> None:
    cache = SessionCache(max_tickets_per_key=2, clock=FakeClock())
    for name in (b"1", b"2", b"3"):
        cache.put("a", ticket(name))
    assert len(cache) == 2
    taken = [cache.take("a"), cache.take("a")]
    assert [t.ticket for t in taken if t] == [b"3", b"2"]


def test_cache_evicts_least_recent_key() -> None:
    cache = SessionCache(max_keys=2, clock=FakeClock())
    cache.put("a", ticket(b"a"))
    cache.put("b", ticket(b"b"))
    cache.put("c", ticket(b"c"))
    assert cache.take("a") is None
    assert cache.take("c") is not None


def test_cache_keys_apart() -> None:
    cache = SessionCache(clock=FakeClock())
    cache.put(("host", 443), ticket(b"t"))
    assert cache.take(("host", 8443)) is None


def test_cache_clear() -> None:
    cache = SessionCache(clock=FakeClock())
    cache.put("a", ticket(b"t"))
    cache.clear()
    assert len(cache) == 0


def test_cache_rejects_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_keys=0"):
        SessionCache(max_keys=0)


def test_obfuscated_age_wraps() -> None:
    entry = SessionTicket(
        b"t", bytes(32), CipherSuite.TLS_AES_128_GCM_SHA256, 2**32 - 1, 60, 10.0
    )
    assert entry.obfuscated_age(10.5) == 499


def test_ticket_lifetime_capped() -> None:
    message = m.NewSessionTicket(2**32 - 1, 0, b"n", b"t")
    stored = ticket_from_message(
        message, CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32), 0.0, (), None
    )
    assert stored is not None
    assert stored.lifetime == 7 * 24 * 3600


def test_zero_lifetime_not_stored() -> None:
    message = m.NewSessionTicket(0, 0, b"n", b"t")
    stored = ticket_from_message(
        message, CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32), 0.0, (), None
    )
    assert stored is None


# Real servers


@pytest.mark.interop
async def test_s_server_fifty_connections_one_signature(pki: Files) -> None:
    cert, key = pki.server()
    identity, signer = counting_identity(pki)
    cache = SessionCache()
    settings = config(
        pki, [identity], session_cache=cache, session_key=("s_server", "one")
    )
    before = metrics.snapshot()
    resumed = []
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        for _ in range(SEQUENTIAL_CONNECTIONS):
            stream, response = await s_server_get(peer, settings)
            resumed.append(stream.resumed)
            assert response.startswith(b"HTTP/1.0 200 ok")
    after = metrics.snapshot()
    assert signer.calls == 1
    assert after.signer_calls - before.signer_calls == 1
    assert resumed == [False] + [True] * (SEQUENTIAL_CONNECTIONS - 1)
    assert after.resumed_handshakes - before.resumed_handshakes == 49
    assert after.full_handshakes - before.full_handshakes == 1


@pytest.mark.interop
async def test_s_server_resumed_keeps_identity(pki: Files) -> None:
    cert, key = pki.server()
    identity = pki.client()
    settings = config(pki, [identity], session_cache=SessionCache(), session_key="k")
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        first, _ = await s_server_get(peer, settings)
        second, response = await s_server_get(peer, settings)
    assert second.resumed
    assert second.peer_chain == first.peer_chain
    assert second.client_identity == identity
    # s_server -www reports "Reused" for a resumed session.
    assert b"Reused, TLSv1.3" in response


@pytest.mark.interop
async def test_s_server_sha384_session(pki: Files) -> None:
    cert, key = pki.server()
    settings = config(
        pki, [pki.client()], session_cache=SessionCache(), session_key="k"
    )
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, ciphersuites="TLS_AES_256_GCM_SHA384"
    ) as peer:
        await s_server_get(peer, settings)
        second, _ = await s_server_get(peer, settings)
    assert second.resumed
    assert second.cipher_suite == "TLS_AES_256_GCM_SHA384"


@pytest.mark.interop
async def test_s_server_hello_retry_resumes(pki: Files) -> None:
    cert, key = pki.server()
    cache = SessionCache()
    settings = config(pki, [pki.client()], session_cache=cache, session_key="k")
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, groups="P-384"
    ) as peer:
        await s_server_get(peer, settings)
        # Replace the learned P-384 hint, so the server requests P-384 again.
        cache.put_key_share_group("k", G.x25519)
        second, response = await s_server_get(peer, settings)
    assert second.connection.hello_retry_requested
    assert second.resumed
    assert response.startswith(b"HTTP/1.0 200 ok")


@pytest.mark.interop
async def test_unknown_ticket_falls_back(pki: Files) -> None:
    cert, key = pki.server()
    identity, signer = counting_identity(pki)
    cache = SessionCache()
    settings = config(pki, [identity], session_cache=cache, session_key="k")
    # A restarted server has new ticket keys, so it ignores the old ticket.
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        await s_server_get(peer, settings)
    assert len(cache) > 0
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream, response = await s_server_get(peer, settings)
    assert not stream.resumed
    assert signer.calls == 2
    assert response.startswith(b"HTTP/1.0 200 ok")


@pytest.mark.interop
async def test_server_without_tickets(pki: Files) -> None:
    cert, key = pki.server()
    cache = SessionCache()
    settings = config(pki, [pki.client()], session_cache=cache, session_key="k")
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, extra_args=["-num_tickets", "0"]
    ) as peer:
        await s_server_get(peer, settings)
        second, _ = await s_server_get(peer, settings)
    assert len(cache) == 0
    assert not second.resumed


@pytest.mark.interop
async def test_no_session_key_no_resumption(pki: Files) -> None:
    cert, key = pki.server()
    identity, signer = counting_identity(pki)
    settings = config(pki, [identity], session_cache=SessionCache())
    with start_openssl_server(pki.directory, cert, key, pki.ca_path) as peer:
        await s_server_get(peer, settings)
        second, _ = await s_server_get(peer, settings)
    assert not second.resumed
    assert signer.calls == 2


@pytest.mark.interop
async def test_python_ssl_resumes(pki: Files) -> None:
    cert, key = pki.server()
    identity, signer = counting_identity(pki)
    settings = config(pki, [identity], session_cache=SessionCache(), session_key="k")
    resumed = []
    async with serve_python_tls(cert, key, pki.ca_path) as peer:
        for _ in range(3):
            stream = await open_tls(peer.port, settings)
            async with stream:
                await stream.send(b"ping")
                assert await stream.receive() == b"ping"
            resumed.append(stream.resumed)
    assert resumed == [False, True, True]
    assert signer.calls == 1


@pytest.mark.interop
async def test_python_ssl_concurrent_without_tickets(pki: Files) -> None:
    # Two connections opened before any ticket arrives both run in full.
    cert, key = pki.server()
    identity, signer = counting_identity(pki)
    settings = config(pki, [identity], session_cache=SessionCache(), session_key="k")
    async with serve_python_tls(cert, key, pki.ca_path) as peer:
        first = await open_tls(peer.port, settings)
        second = await open_tls(peer.port, settings)
        async with first, second:
            pass
    assert not first.resumed
    assert not second.resumed
    assert signer.calls == 2


# Go crypto/tls, GnuTLS and Node.js


@pytest.fixture(scope="session")
def go_server_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_go_server(tmp_path_factory.mktemp("go-build"))


@pytest.fixture
def peer_files(tmp_path: Path) -> PeerFiles:
    directory = tmp_path / "peers"
    directory.mkdir()
    return make_peer_files(directory)


@pytest.mark.interop
async def test_go_fifty_connections_one_signature(
    peer_files: PeerFiles, go_server_binary: Path
) -> None:
    cert, key = peer_files.server()
    identity, signer = counting_identity(peer_files)
    settings = peer_files.config(
        identity, session_cache=SessionCache(), session_key=("go", "one")
    )
    before = metrics.snapshot()
    reported = []
    with start_go_server(
        peer_files.directory, go_server_binary, cert, key, peer_files.ca_path
    ) as peer:
        for _ in range(SEQUENTIAL_CONNECTIONS):
            stream = await open_peer_tls(peer.port, settings)
            async with stream:
                reply = await exchange(stream, b"ping\n")
            fields, echoed = split_header(reply)
            assert echoed == b"ping\n"
            reported.append((stream.resumed, fields["resumed"], fields["subject"]))
    after = metrics.snapshot()
    assert signer.calls == 1
    assert after.signer_calls - before.signer_calls == 1
    assert reported[0] == (False, "false", "CN=client p256")
    # Go keeps the client certificate in its ticket and reports it again.
    assert set(reported[1:]) == {(True, "true", "CN=client p256")}


@pytest.mark.interop
async def test_go_without_tickets(
    peer_files: PeerFiles, go_server_binary: Path
) -> None:
    cert, key = peer_files.server()
    identity, signer = counting_identity(peer_files)
    cache = SessionCache()
    settings = peer_files.config(identity, session_cache=cache, session_key="go")
    with start_go_server(
        peer_files.directory,
        go_server_binary,
        cert,
        key,
        peer_files.ca_path,
        tickets=False,
    ) as peer:
        for _ in range(2):
            stream = await open_peer_tls(peer.port, settings)
            async with stream:
                await exchange(stream, b"ping\n")
            assert not stream.resumed
    assert signer.calls == 2
    assert len(cache) == 0


@pytest.mark.interop
async def test_gnutls_resumes(peer_files: PeerFiles) -> None:
    cert, key = peer_files.server()
    identity, signer = counting_identity(peer_files)
    settings = peer_files.config(
        identity, session_cache=SessionCache(), session_key="gnutls"
    )
    resumed = []
    with start_gnutls_server(
        peer_files.directory, cert, key, peer_files.ca_path
    ) as peer:
        for _ in range(3):
            stream = await open_peer_tls(peer.port, settings)
            async with stream:
                assert await exchange(stream, b"ping\n") == b"ping\n"
            resumed.append(stream.resumed)
    assert resumed == [False, True, True]
    assert signer.calls == 1


@pytest.mark.interop
async def test_node_resumes(peer_files: PeerFiles) -> None:
    cert, key = peer_files.server()
    identity, signer = counting_identity(peer_files)
    settings = peer_files.config(
        identity, session_cache=SessionCache(), session_key="node"
    )
    resumed = []
    with start_node_server(peer_files.directory, cert, key, peer_files.ca_path) as peer:
        for _ in range(3):
            stream = await open_peer_tls(peer.port, settings)
            async with stream:
                reply = await exchange(stream, b"ping\n")
            assert split_header(reply)[1] == b"ping\n"
            resumed.append(stream.resumed)
    assert resumed == [False, True, True]
    assert signer.calls == 1


# Encoders


@given(
    identity=st.binary(min_size=1, max_size=300),
    age=st.integers(0, 2**32 - 1),
    binder=st.binary(min_size=32, max_size=255),
)
def test_offered_psks_round_trip(identity: bytes, age: int, binder: bytes) -> None:
    offered = m.OfferedPsks([m.PskIdentity(identity, age)], [binder])
    assert m.pull_offered_psks(m.push_offered_psks(offered)) == offered


@given(modes=st.lists(st.sampled_from(list(m.PskKeyExchangeMode)), min_size=1))
def test_psk_modes_round_trip(modes: list[m.PskKeyExchangeMode]) -> None:
    data = m.push_psk_key_exchange_modes(modes)
    assert m.pull_psk_key_exchange_modes(data) == list(modes)


def test_offered_psks_binder_count_mismatch() -> None:
    offered = m.OfferedPsks(
        [m.PskIdentity(b"a", 0), m.PskIdentity(b"b", 0)], [bytes(32)]
    )
    with pytest.raises(alerts.IllegalParameter, match="2 identities but 1 binders"):
        m.pull_offered_psks(m.push_offered_psks(offered))


def test_offered_psks_short_binder() -> None:
    data = m.push_offered_psks(m.OfferedPsks([m.PskIdentity(b"a", 0)], [bytes(32)]))
    # Shorten the one binder to 31 bytes, fixing up both length fields.
    broken = data[:-35] + b"\x00\x20\x1f" + bytes(31)
    with pytest.raises(alerts.DecodeError):
        m.pull_offered_psks(broken)


# Byte level, against the scripted server

CA = make_ca("resumption CA")
SERVER = issue(CA, "server", dns_names=("server.test",))
CLIENT = issue(CA, "client", client=True)
PSK = bytes(range(32))


def stored_ticket(
    clock: FakeClock, suite: CipherSuite = CipherSuite.TLS_AES_128_GCM_SHA256
) -> SessionTicket:
    return SessionTicket(
        ticket=b"opaque ticket",
        psk=PSK,
        cipher_suite=suite,
        ticket_age_add=5,
        lifetime=60,
        received_at=clock.now,
        peer_chain=(SERVER.cert,),
    )


def resuming(
    suite: CipherSuite = CipherSuite.TLS_AES_128_GCM_SHA256,
    server_suite: int = CipherSuite.TLS_AES_128_GCM_SHA256,
) -> tuple[ClientConnection, ScriptedServer, SessionCache]:
    clock = FakeClock()
    cache = SessionCache(clock=clock)
    cache.put("k", stored_ticket(clock, suite))
    client = ClientConnection(
        TLSClientConfig(
            "server.test",
            identities=[scripted_identity(CLIENT)],
            session_cache=cache,
            session_key="k",
        )
    )
    server = ScriptedServer(SERVER, suite_code=server_suite)
    client.start()
    server.read_client_hello(client.data_to_send())
    return client, server, cache


def test_hello_offers_ticket_last() -> None:
    _client, server, _cache = resuming()
    assert server.client_hello is not None
    assert server.client_hello.extensions[-1][0] == E.pre_shared_key
    modes = m.pull_psk_key_exchange_modes(
        server.client_extension(E.psk_key_exchange_modes) or b""
    )
    assert modes == [m.PskKeyExchangeMode.psk_dhe_ke]
    offered = m.pull_offered_psks(server.client_extension(E.pre_shared_key) or b"")
    assert offered.identities == [m.PskIdentity(b"opaque ticket", 5)]


def test_hello_binder_verifies() -> None:
    _client, server, _cache = resuming()
    assert server.client_hello is not None
    offered = m.pull_offered_psks(server.client_extension(E.pre_shared_key) or b"")
    suite = ks.SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
    truncated = m.push_client_hello(server.client_hello)[:-35]
    expected = ks.KeySchedule(suite, PSK).binder(ks.transcript_digest(suite, truncated))
    assert offered.binders == [expected]


def test_ticket_taken_once() -> None:
    _client, _server, cache = resuming()
    assert cache.take("k") is None


def test_resumed_handshake_skips_certificate() -> None:
    client, server, _cache = resuming()
    server.psk, server.selected_identity = PSK, 0
    client.receive_data(
        server.server_hello() + server.encrypted_extensions() + server.finished()
    )
    found = client_events(client)
    records = server.read_client_finished(client.data_to_send())
    assert [type(event) for event in found] == [HandshakeComplete]
    assert client.resumed
    assert client.peer_chain == [SERVER.cert]
    assert [record[1][0] for record in records] == [m.HandshakeType.finished]


def test_ticket_not_selected_runs_full_handshake() -> None:
    client, server, _cache = resuming()
    client.receive_data(server.server_hello() + server.flight())
    assert client.handshake_complete
    assert not client.resumed


def test_certificate_in_resumed_handshake() -> None:
    client, server, _cache = resuming()
    server.psk, server.selected_identity = PSK, 0
    wire = server.server_hello() + server.encrypted_extensions() + server.certificate()
    with pytest.raises(alerts.UnexpectedMessage):
        client.receive_data(wire)
    assert (
        server.client_alert(client.data_to_send())
        == AlertDescription.unexpected_message
    )


def test_identity_not_offered() -> None:
    client, server, _cache = resuming()
    server.psk, server.selected_identity = PSK, 1
    with pytest.raises(alerts.IllegalParameter, match="PSK identity 1"):
        client.receive_data(server.server_hello())


def test_resumed_with_other_hash() -> None:
    client, server, _cache = resuming(server_suite=CipherSuite.TLS_AES_256_GCM_SHA384)
    server.psk, server.selected_identity = PSK, 0
    with pytest.raises(alerts.IllegalParameter, match="hash differs"):
        client.receive_data(server.server_hello())


def test_expired_ticket_not_offered() -> None:
    clock = FakeClock()
    cache = SessionCache(clock=clock)
    cache.put("k", stored_ticket(clock))
    clock.now += 60
    client = ClientConnection(
        TLSClientConfig("server.test", session_cache=cache, session_key="k")
    )
    server = ScriptedServer(SERVER)
    client.start()
    server.read_client_hello(client.data_to_send())
    assert server.client_extension(E.pre_shared_key) is None


def test_retry_keeps_ticket_last() -> None:
    client, server, _cache = resuming()
    assert server.client_hello is not None
    first_hello = m.push_client_hello(server.client_hello)
    retry_record = server.hello_retry_request(G.secp256r1, cookie=b"cookie")
    client.receive_data(retry_record)
    retry = server.read_second_client_hello(client.data_to_send())
    assert [t for t, _ in retry.extensions][-2:] == [E.cookie, E.pre_shared_key]

    # The binder covers message_hash(ClientHello1), the HelloRetryRequest
    # and the truncated second ClientHello (RFC 8446 section 4.2.11.2).
    suite = ks.SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
    message_hash = bytes([254, 0, 0, 32]) + ks.transcript_digest(suite, first_hello)
    truncated = m.push_client_hello(retry)[:-35]
    transcript = message_hash + retry_record[5:] + truncated
    expected = ks.KeySchedule(suite, PSK).binder(
        ks.transcript_digest(suite, transcript)
    )
    offered = m.pull_offered_psks(
        m.find_extension(retry.extensions, E.pre_shared_key) or b""
    )
    assert offered.binders == [expected]

    server.psk, server.selected_identity = PSK, 0
    client.receive_data(
        server.server_hello() + server.encrypted_extensions() + server.finished()
    )
    assert client.resumed


def test_retry_to_other_hash_drops_ticket() -> None:
    client, server, _cache = resuming(server_suite=CipherSuite.TLS_AES_256_GCM_SHA384)
    client.receive_data(server.hello_retry_request(G.secp256r1))
    retry = server.read_second_client_hello(client.data_to_send())
    assert m.find_extension(retry.extensions, E.pre_shared_key) is None
    client.receive_data(server.server_hello() + server.flight())
    assert not client.resumed


def test_ticket_stored_after_full_handshake() -> None:
    cache = SessionCache()
    client = ClientConnection(
        TLSClientConfig("server.test", session_cache=cache, session_key="k")
    )
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    tickets = [
        m.NewSessionTicket(0, 1, b"a", b"dropped"),
        m.NewSessionTicket(30, 1, b"b", b"kept"),
    ]
    client.receive_data(
        b"".join(
            server.protect(ContentType.handshake, m.push_new_session_ticket(t))
            for t in tickets
        )
    )
    stored = cache.take("k")
    assert stored is not None
    assert stored.ticket == b"kept"
    assert stored.lifetime == 30
    assert stored.peer_chain == (SERVER.cert,)
    assert cache.take("k") is None


def test_truncated_ticket_message() -> None:
    client = ClientConnection(TLSClientConfig("server.test"))
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    message = m.push_new_session_ticket(m.NewSessionTicket(30, 1, b"n", b"ticket"))
    broken = bytes([message[0]]) + (len(message) - 5).to_bytes(3, "big") + message[4:-1]
    with pytest.raises(alerts.DecodeError):
        client.receive_data(server.protect(ContentType.handshake, broken))
    assert server.client_alert(client.data_to_send()) == AlertDescription.decode_error
