"""The group hint: after a handshake, the session cache stores the group the
server selected, and the next ClientHello to that upstream sends a share for
that group only. supported_groups still lists every group, so a server that
changed its choice replies with a HelloRetryRequest (RFC 8446 section 4.1.4).

Most tests run Python's `ssl` server in memory, so one server context can
change its group between connections and keep its ticket keys.
"""

from __future__ import annotations

import ssl
from collections.abc import Hashable
from pathlib import Path

import pytest
from peers import start_openssl_server
from pki import issue, make_ca
from tls_peers_pki import Files, config, make_files, s_server_get

from kmsproxy.tls import SessionCache, TrustStore
from kmsproxy.tls import messages as m
from kmsproxy.tls.alerts import TLSError
from kmsproxy.tls.client import ClientConnection
from kmsproxy.tls.config import TLSClientConfig
from kmsproxy.tls.hello import SUPPORTED_GROUPS
from kmsproxy.tls.records import ContentType
from kmsproxy.tls.session_cache import GROUP_HINT_LIFETIME_SECONDS
from kmsproxy.tls.tls12.client12 import ClientConnection12

G = m.NamedGroup

SERVER_NAME = "localhost"
SESSION_KEY = ("localhost", 443)

# Flights one in-memory handshake may take: two ClientHellos around a
# HelloRetryRequest, the server's flight, our Finished, and spares.
MAX_FLIGHTS = 8

# TLS record header: type (1), legacy_record_version (2), length (2).
RECORD_HEADER_LENGTH = 5


class Upstream:
    """A Python `ssl` server context with a throwaway certificate, and a
    trust store for it."""

    def __init__(self, directory: Path, ca_name: str = "group hint CA") -> None:
        ca = make_ca(ca_name)
        ca_path = directory / "ca.crt"
        ca_path.write_bytes(ca.chain_pem())
        key_path, cert_path = issue(ca, "server", dns_names=(SERVER_NAME,)).write(
            directory, "server"
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.load_cert_chain(cert_path, key_path)
        self.trust = TrustStore.load([ca_path], include_system=False)


class Connection:
    """The outcome of one in-memory handshake. `tls12` is the TLS 1.2
    machine when the server selected TLS 1.2, else None."""

    def __init__(
        self,
        client: ClientConnection,
        tls12: ClientConnection12 | None,
        hellos: list[m.ClientHello],
    ):
        self.client = client
        self.tls12 = tls12
        self.hellos = hellos

    def shares(self, index: int = 0) -> list[int]:
        """Return the groups of the key shares in ClientHello number `index`."""
        data = m.find_extension(
            self.hellos[index].extensions, m.ExtensionType.key_share
        )
        assert data is not None
        return [entry.group for entry in m.pull_key_share_client(data)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings_for(
    upstream: Upstream, cache: SessionCache, session_key: Hashable | None = SESSION_KEY
) -> TLSClientConfig:
    return TLSClientConfig(
        SERVER_NAME,
        trust=upstream.trust,
        session_cache=cache,
        session_key=session_key,
    )


def client_hellos(data: bytes) -> list[m.ClientHello]:
    """Parse the ClientHellos in our records. Each fits in one record, and
    other handshake records may be encrypted (a TLS 1.2 Finished), so only
    records that start with a ClientHello are parsed."""
    hellos = []
    offset = 0
    while offset < len(data):
        content_type = data[offset]
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        start = offset + RECORD_HEADER_LENGTH
        content = bytearray(data[start : start + length])
        offset = start + length
        if content_type != ContentType.handshake:
            continue
        if content[0] != m.HandshakeType.client_hello:
            continue
        message = m.pop_handshake_message(content)
        assert message is not None
        hellos.append(m.pull_client_hello(message[m.HANDSHAKE_HEADER_LENGTH :]))
    return hellos


def connect(upstream: Upstream, settings: TLSClientConfig) -> Connection:
    """Run one handshake against `upstream` in memory, tickets included."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = upstream.context.wrap_bio(incoming, outgoing, server_side=True)
    client = ClientConnection(settings)
    client.start()
    # The TLS 1.2 machine takes over when the server selects TLS 1.2.
    active: ClientConnection | ClientConnection12 = client
    hellos: list[m.ClientHello] = []
    for _ in range(MAX_FLIGHTS):
        data = active.data_to_send()
        hellos += client_hellos(data)
        incoming.write(data)
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            server_done = False
        else:
            server_done = True
        active.receive_data(outgoing.read())
        active = client.tls12 or client
        if server_done:
            break
    else:
        raise AssertionError(f"no handshake within {MAX_FLIGHTS} flights")
    assert active.handshake_complete
    return Connection(client, client.tls12, hellos)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def upstream(tmp_path: Path) -> Upstream:
    return Upstream(tmp_path)


# ClientHello shares


def test_first_hello_sends_both_shares(upstream: Upstream) -> None:
    first = connect(upstream, settings_for(upstream, SessionCache()))
    assert first.shares() == [G.X25519MLKEM768, G.x25519]
    # OpenSSL 3.0 has no ML-KEM, so the server selects x25519.
    assert first.client.key_exchange_group == G.x25519


def test_next_hello_sends_one_share(upstream: Upstream) -> None:
    settings = settings_for(upstream, SessionCache())
    connect(upstream, settings)
    second = connect(upstream, settings)
    assert second.shares() == [G.x25519]
    assert not second.client.hello_retry_requested
    assert second.client.resumed


def test_hinted_hello_lists_every_group(upstream: Upstream) -> None:
    settings = settings_for(upstream, SessionCache())
    connect(upstream, settings)
    second = connect(upstream, settings)
    data = m.find_extension(
        second.hellos[0].extensions, m.ExtensionType.supported_groups
    )
    assert data == m.push_uint16_list_extension(list(SUPPORTED_GROUPS))


def test_other_upstream_gets_both_shares(upstream: Upstream) -> None:
    cache = SessionCache()
    connect(upstream, settings_for(upstream, cache))
    other = connect(upstream, settings_for(upstream, cache, ("localhost", 8443)))
    assert other.shares() == [G.X25519MLKEM768, G.x25519]


def test_no_session_key_no_hint(upstream: Upstream) -> None:
    settings = settings_for(upstream, SessionCache(), session_key=None)
    connect(upstream, settings)
    second = connect(upstream, settings)
    assert second.shares() == [G.X25519MLKEM768, G.x25519]


# A server that changes its group


def test_changed_group_retries_and_resumes(upstream: Upstream) -> None:
    settings = settings_for(upstream, SessionCache())
    connect(upstream, settings)
    upstream.context.set_ecdh_curve("secp384r1")
    second = connect(upstream, settings)
    assert second.client.hello_retry_requested
    assert second.shares(0) == [G.x25519]
    assert second.shares(1) == [G.secp384r1]
    assert second.client.key_exchange_group == G.secp384r1
    # The same server context keeps its ticket keys, so the ticket offered
    # again in the second ClientHello resumes.
    assert second.client.resumed


def test_retry_group_becomes_hint(upstream: Upstream) -> None:
    settings = settings_for(upstream, SessionCache())
    connect(upstream, settings)
    upstream.context.set_ecdh_curve("secp384r1")
    connect(upstream, settings)
    third = connect(upstream, settings)
    assert third.shares() == [G.secp384r1]
    assert not third.client.hello_retry_requested


def test_untrusted_server_leaves_no_hint(upstream: Upstream, tmp_path: Path) -> None:
    other_directory = tmp_path / "other"
    other_directory.mkdir()
    impostor = Upstream(other_directory, "impostor CA")
    cache = SessionCache()
    # The client trusts the CA of `upstream`, but `impostor` accepts the connection.
    with pytest.raises(TLSError):
        connect(impostor, settings_for(upstream, cache))
    assert cache.key_share_group(SESSION_KEY) is None


@pytest.mark.interop
@pytest.mark.anyio
async def test_s_server_changed_group_retries(tmp_path: Path) -> None:
    pki: Files = make_files(tmp_path, "group hint CA")
    cert, key = pki.server()
    cache = SessionCache()
    settings = config(pki, [pki.client()], session_cache=cache, session_key="k")
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, groups="X25519"
    ) as peer:
        await s_server_get(peer, settings)
    assert cache.key_share_group("k") == G.x25519
    # A restarted server that now accepts only P-256.
    with start_openssl_server(
        pki.directory, cert, key, pki.ca_path, groups="P-256"
    ) as peer:
        second, response = await s_server_get(peer, settings)
        third, _ = await s_server_get(peer, settings)
    assert second.connection.hello_retry_requested
    assert response.startswith(b"HTTP/1.0 200 ok")
    assert not third.connection.hello_retry_requested
    assert third.connection.key_exchange_group == G.secp256r1


# TLS 1.2 servers


def test_tls12_group_becomes_hint(upstream: Upstream) -> None:
    upstream.context.minimum_version = ssl.TLSVersion.TLSv1_2
    upstream.context.maximum_version = ssl.TLSVersion.TLSv1_2
    cache = SessionCache()
    first = connect(upstream, settings_for(upstream, cache))
    assert first.tls12 is not None
    assert first.tls12.key_exchange_group == G.x25519
    assert cache.key_share_group(SESSION_KEY) == G.x25519


def test_tls12_next_hello_sends_one_share(upstream: Upstream) -> None:
    upstream.context.minimum_version = ssl.TLSVersion.TLSv1_2
    upstream.context.maximum_version = ssl.TLSVersion.TLSv1_2
    settings = settings_for(upstream, SessionCache())
    connect(upstream, settings)
    second = connect(upstream, settings)
    assert second.shares() == [G.x25519]
    assert second.tls12 is not None
    assert second.tls12.resumed


def test_tls12_upgrade_to_tls13_retries(upstream: Upstream) -> None:
    # A TLS 1.2 server that selected P-256, then upgraded to TLS 1.3 with
    # only P-384.
    upstream.context.maximum_version = ssl.TLSVersion.TLSv1_2
    upstream.context.minimum_version = ssl.TLSVersion.TLSv1_2
    upstream.context.set_ecdh_curve("prime256v1")
    settings = settings_for(upstream, SessionCache())
    connect(upstream, settings)
    upstream.context.maximum_version = ssl.TLSVersion.TLSv1_3
    upstream.context.minimum_version = ssl.TLSVersion.TLSv1_3
    upstream.context.set_ecdh_curve("secp384r1")
    upgraded = connect(upstream, settings)
    assert upgraded.shares(0) == [G.secp256r1]
    assert upgraded.client.hello_retry_requested
    assert upgraded.client.key_exchange_group == G.secp384r1


# The cache's hints


def test_cache_bounds_hints() -> None:
    cache = SessionCache(max_keys=2)
    cache.put_key_share_group("a", G.x25519)
    cache.put_key_share_group("b", G.x25519)
    cache.put_key_share_group("c", G.secp256r1)
    assert cache.key_share_group("a") is None
    assert cache.key_share_group("b") == G.x25519
    assert cache.key_share_group("c") == G.secp256r1


def test_cache_lookup_refreshes_hint() -> None:
    cache = SessionCache(max_keys=2)
    cache.put_key_share_group("a", G.x25519)
    cache.put_key_share_group("b", G.x25519)
    cache.key_share_group("a")
    cache.put_key_share_group("c", G.x25519)
    assert cache.key_share_group("a") == G.x25519
    assert cache.key_share_group("b") is None


def test_cache_hint_expires() -> None:
    clock = FakeClock()
    cache = SessionCache(clock=clock)
    cache.put_key_share_group("a", G.x25519)
    clock.now += GROUP_HINT_LIFETIME_SECONDS - 1
    assert cache.key_share_group("a") == G.x25519
    clock.now += 1
    assert cache.key_share_group("a") is None


def test_expired_hint_sends_both_shares(upstream: Upstream) -> None:
    clock = FakeClock()
    settings = settings_for(upstream, SessionCache(clock=clock))
    connect(upstream, settings)
    clock.now += GROUP_HINT_LIFETIME_SECONDS
    later = connect(upstream, settings)
    assert later.shares() == [G.X25519MLKEM768, G.x25519]


def test_used_hint_still_expires(upstream: Upstream) -> None:
    # Each handshake stores the hint again. The hybrid share must still go
    # out once per lifetime, or an upstream that adds it would never see it.
    clock = FakeClock()
    settings = settings_for(upstream, SessionCache(clock=clock))
    connect(upstream, settings)
    clock.now += GROUP_HINT_LIFETIME_SECONDS * 0.9
    second = connect(upstream, settings)
    assert second.shares() == [G.x25519]
    clock.now += GROUP_HINT_LIFETIME_SECONDS * 0.9
    third = connect(upstream, settings)
    assert third.shares() == [G.X25519MLKEM768, G.x25519]


def test_cache_same_group_keeps_time() -> None:
    clock = FakeClock()
    cache = SessionCache(clock=clock)
    cache.put_key_share_group("a", G.x25519)
    clock.now += GROUP_HINT_LIFETIME_SECONDS - 1
    cache.put_key_share_group("a", G.x25519)
    clock.now += 1
    assert cache.key_share_group("a") is None


def test_cache_new_group_resets_time() -> None:
    clock = FakeClock()
    cache = SessionCache(clock=clock)
    cache.put_key_share_group("a", G.x25519)
    clock.now += GROUP_HINT_LIFETIME_SECONDS - 1
    cache.put_key_share_group("a", G.secp256r1)
    clock.now += 1
    assert cache.key_share_group("a") == G.secp256r1


def test_tls12_used_hint_still_expires(upstream: Upstream) -> None:
    upstream.context.minimum_version = ssl.TLSVersion.TLSv1_2
    upstream.context.maximum_version = ssl.TLSVersion.TLSv1_2
    clock = FakeClock()
    settings = settings_for(upstream, SessionCache(clock=clock))
    connect(upstream, settings)
    clock.now += GROUP_HINT_LIFETIME_SECONDS * 0.9
    second = connect(upstream, settings)
    assert second.shares() == [G.x25519]
    clock.now += GROUP_HINT_LIFETIME_SECONDS * 0.9
    third = connect(upstream, settings)
    assert third.shares() == [G.X25519MLKEM768, G.x25519]


def test_tls12_resumption_renews_hint(upstream: Upstream) -> None:
    # After the hint expired, a resumed TLS 1.2 handshake stores the group
    # of its session again, as a resumed TLS 1.3 handshake stores its own.
    upstream.context.minimum_version = ssl.TLSVersion.TLSv1_2
    upstream.context.maximum_version = ssl.TLSVersion.TLSv1_2
    clock = FakeClock()
    settings = settings_for(upstream, SessionCache(clock=clock))
    connect(upstream, settings)
    clock.now += GROUP_HINT_LIFETIME_SECONDS * 1.1
    second = connect(upstream, settings)
    assert second.shares() == [G.X25519MLKEM768, G.x25519]
    assert second.tls12 is not None
    assert second.tls12.resumed
    third = connect(upstream, settings)
    assert third.shares() == [G.x25519]


def test_cache_hint_not_a_ticket() -> None:
    cache = SessionCache()
    cache.put_key_share_group("a", G.x25519)
    assert len(cache) == 0
    assert cache.take("a") is None


def test_cache_clear_drops_hints() -> None:
    cache = SessionCache()
    cache.put_key_share_group("a", G.x25519)
    cache.clear()
    assert cache.key_share_group("a") is None
