"""RFC 8448 section 3 ("Simple 1-RTT Handshake") and section 4 ("Resumed
0-RTT Handshake", its PSK and binder) against our key schedule, record layer
and message codecs. Expected values come from the vector file,
never from the code under test."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from scripted_server import plaintext_record

from kmsproxy.tls import key_schedule as ks
from kmsproxy.tls import messages as m
from kmsproxy.tls.client import ClientConnection
from kmsproxy.tls.config import TLSClientConfig
from kmsproxy.tls.records import ContentType, RecordCipher, RecordLayer
from kmsproxy.tls.resumption import offer_ticket, without_ticket
from kmsproxy.tls.session_cache import SessionCache, SessionTicket

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "rfc8448-simple-1rtt.json").read_text()
)
VALUES: dict[str, str] = VECTORS["values"]
MESSAGES: dict[str, str] = VECTORS["handshake_messages"]
SUITE = ks.SUITES[ks.CipherSuite.TLS_AES_128_GCM_SHA256]


def value(name: str) -> bytes:
    return bytes.fromhex(VALUES[name])


def message(name: str) -> bytes:
    return bytes.fromhex(MESSAGES[name])


def transcript_hash(*names: str) -> bytes:
    return ks.transcript_digest(SUITE, b"".join(message(n) for n in names))


HELLO = ("ClientHello", "ServerHello")
SERVER_FLIGHT = (
    *HELLO,
    "EncryptedExtensions",
    "Certificate",
    "CertificateVerify",
    "Finished",
)


@pytest.fixture
def schedule() -> ks.KeySchedule:
    private_key = x25519.X25519PrivateKey.from_private_bytes(
        value("client_private_key")
    )
    server_public = x25519.X25519PublicKey.from_public_bytes(value("server_public_key"))
    schedule = ks.KeySchedule(SUITE)
    schedule.set_shared_secret(private_key.exchange(server_public))
    return schedule


def test_x25519_shared_secret() -> None:
    private_key = x25519.X25519PrivateKey.from_private_bytes(
        value("client_private_key")
    )
    public = x25519.X25519PublicKey.from_public_bytes(value("server_public_key"))
    assert private_key.exchange(public) == value("shared_secret")


def test_early_secret() -> None:
    assert ks.KeySchedule(SUITE).early_secret == value("early_secret")


def test_handshake_secret(schedule: ks.KeySchedule) -> None:
    assert schedule.handshake_secret == value("handshake_secret")


def test_master_secret(schedule: ks.KeySchedule) -> None:
    assert schedule.master_secret == value("master_secret")


def test_derived_secrets(schedule: ks.KeySchedule) -> None:
    empty = ks.transcript_digest(SUITE, b"")
    derived_early = ks.derive_secret(SUITE, schedule.early_secret, b"derived", empty)
    derived_master = ks.derive_secret(
        SUITE, schedule.handshake_secret, b"derived", empty
    )
    assert derived_early == value("derived_early_secret")
    assert derived_master == value("derived_master_secret")


def test_handshake_traffic_secrets(schedule: ks.KeySchedule) -> None:
    client, server = schedule.handshake_traffic_secrets(transcript_hash(*HELLO))
    assert client == value("client_hs_traffic_secret")
    assert server == value("server_hs_traffic_secret")


def test_application_traffic_secrets(schedule: ks.KeySchedule) -> None:
    client, server = schedule.application_traffic_secrets(
        transcript_hash(*SERVER_FLIGHT)
    )
    assert client == value("client_ap_traffic_secret")
    assert server == value("server_ap_traffic_secret")


@pytest.mark.parametrize(
    ("secret", "key", "iv"),
    [
        ("server_hs_traffic_secret", "server_hs_write_key", "server_hs_write_iv"),
        ("client_hs_traffic_secret", "client_hs_write_key", "client_hs_write_iv"),
        ("client_ap_traffic_secret", "client_app_write_key", "client_app_write_iv"),
    ],
)
def test_traffic_keys(secret: str, key: str, iv: str) -> None:
    keys = ks.traffic_keys(SUITE, value(secret))
    assert keys.key == value(key)
    assert keys.iv == value(iv)


def test_finished_keys() -> None:
    server_key = ks.finished_key(SUITE, value("server_hs_traffic_secret"))
    client_key = ks.finished_key(SUITE, value("client_hs_traffic_secret"))
    assert server_key == value("server_finished_key")
    assert client_key == value("client_finished_key")


def test_server_finished_verify_data() -> None:
    verify_data = ks.finished_verify_data(
        SUITE,
        value("server_hs_traffic_secret"),
        transcript_hash(
            *HELLO, "EncryptedExtensions", "Certificate", "CertificateVerify"
        ),
    )
    assert m.push_finished(m.Finished(verify_data)) == value("server_finished_message")


def test_client_finished_verify_data() -> None:
    verify_data = ks.finished_verify_data(
        SUITE, value("client_hs_traffic_secret"), transcript_hash(*SERVER_FLIGHT)
    )
    assert m.push_finished(m.Finished(verify_data)) == value("client_finished_message")


def test_transcript_matches_one_shot_hash() -> None:
    transcript = ks.Transcript()
    transcript.add(message("ClientHello"))
    transcript.select_suite(SUITE)
    for name in SERVER_FLIGHT[1:]:
        transcript.add(message(name))
    assert transcript.digest() == transcript_hash(*SERVER_FLIGHT)


def test_client_record_encrypts() -> None:
    cipher = RecordCipher(SUITE, value("client_ap_traffic_secret"))
    record = cipher.seal(ContentType.application_data, value("client_app_payload"))
    assert record == value("client_app_record")


def test_client_record_decrypts() -> None:
    layer = RecordLayer()
    layer.read_cipher = RecordCipher(SUITE, value("client_ap_traffic_secret"))
    layer.feed(value("client_app_record"))
    assert layer.next_record() == (
        ContentType.application_data,
        value("client_app_payload"),
    )
    assert layer.next_record() is None


def test_records_framed_from_one_read() -> None:
    writer = RecordLayer()
    writer.write_cipher = RecordCipher(SUITE, value("client_ap_traffic_secret"))
    reader = RecordLayer()
    reader.read_cipher = RecordCipher(SUITE, value("client_ap_traffic_secret"))
    # Five whole records and the first 10 bytes of a sixth, as one large
    # transport read delivers them.
    records = writer.encode(ContentType.application_data, bytes(5 * 2**14))
    partial = writer.encode(ContentType.application_data, b"next")[:10]
    reader.feed(records + partial)
    contents = [reader.next_record() for _ in range(5)]
    assert contents == [(ContentType.application_data, bytes(2**14))] * 5
    assert reader.next_record() is None
    assert reader.buffered == len(partial)
    assert reader.take_buffered() == partial


def test_padded_record_decrypts() -> None:
    cipher = RecordCipher(SUITE, value("client_ap_traffic_secret"))
    record = cipher.seal(ContentType.application_data, b"data", padding_length=7)
    layer = RecordLayer()
    layer.read_cipher = RecordCipher(SUITE, value("client_ap_traffic_secret"))
    layer.feed(record)
    assert layer.next_record() == (ContentType.application_data, b"data")


def test_record_sequence_advances() -> None:
    cipher = RecordCipher(SUITE, value("client_ap_traffic_secret"))
    first = cipher.seal(ContentType.application_data, value("client_app_payload"))
    second = cipher.seal(ContentType.application_data, value("client_app_payload"))
    assert first == value("client_app_record")
    assert second != first
    assert cipher.sequence_number == 2


Codec = tuple[Callable[[bytes], Any], Callable[[Any], bytes]]

CODECS: dict[str, Codec] = {
    "ClientHello": (m.pull_client_hello, m.push_client_hello),
    "ServerHello": (m.pull_server_hello, m.push_server_hello),
    "EncryptedExtensions": (m.pull_encrypted_extensions, m.push_encrypted_extensions),
    "Certificate": (m.pull_certificate, m.push_certificate),
    "CertificateVerify": (m.pull_certificate_verify, m.push_certificate_verify),
    "Finished": (lambda body: m.pull_finished(body, 32), m.push_finished),
}


@pytest.mark.parametrize("name", list(CODECS))
def test_message_round_trip(name: str) -> None:
    pull, push = CODECS[name]
    wire = message(name)
    parsed = pull(wire[m.HANDSHAKE_HEADER_LENGTH :])
    assert push(parsed) == wire


def test_client_hello_fields() -> None:
    hello = m.pull_client_hello(message("ClientHello")[4:])
    shares = m.pull_key_share_client(
        m.find_extension(hello.extensions, m.ExtensionType.key_share) or b""
    )
    versions = m.pull_supported_versions_client(
        m.find_extension(hello.extensions, m.ExtensionType.supported_versions) or b""
    )
    assert hello.cipher_suites == [0x1301, 0x1303, 0x1302]
    assert shares == [m.KeyShareEntry(m.NamedGroup.x25519, value("client_public_key"))]
    assert versions == [m.TLS_1_3]


def test_server_hello_fields() -> None:
    hello = m.pull_server_hello(message("ServerHello")[4:])
    assert hello.extensions is not None
    share = m.pull_key_share_server(
        m.find_extension(hello.extensions, m.ExtensionType.key_share) or b""
    )
    version = m.pull_uint16_extension(
        m.find_extension(hello.extensions, m.ExtensionType.supported_versions) or b"",
        "supported_versions",
    )
    assert hello.cipher_suite == ks.CipherSuite.TLS_AES_128_GCM_SHA256
    assert not hello.is_hello_retry_request
    assert share == m.KeyShareEntry(m.NamedGroup.x25519, value("server_public_key"))
    assert version == m.TLS_1_3


def test_certificate_verify_fields() -> None:
    verify = m.pull_certificate_verify(message("CertificateVerify")[4:])
    assert verify.algorithm == 0x0804
    assert len(verify.signature) == 128


class ReplayedClient(ClientConnection):
    """A client that sends the RFC's ClientHello with the RFC's x25519 key,
    so the RFC's server flight decrypts and verifies against it."""

    def _build_client_hello(self) -> m.ClientHello:
        private_key = x25519.X25519PrivateKey.from_private_bytes(
            value("client_private_key")
        )
        self._key_shares = {m.NamedGroup.x25519: private_key}
        return m.pull_client_hello(message("ClientHello")[4:])


def test_client_replays_rfc_handshake() -> None:
    client = ReplayedClient(TLSClientConfig("server"))
    client.start()
    assert client.data_to_send()[5:] == message("ClientHello")

    server_flight = b"".join(message(name) for name in SERVER_FLIGHT[2:])
    server_cipher = RecordCipher(SUITE, value("server_hs_traffic_secret"))
    client.receive_data(
        plaintext_record(ContentType.handshake, message("ServerHello"))
        + server_cipher.seal(ContentType.handshake, server_flight)
    )
    assert client.handshake_complete

    reader = RecordLayer()
    reader.read_cipher = RecordCipher(SUITE, value("client_hs_traffic_secret"))
    reader.feed(client.data_to_send())
    assert reader.next_record() == (ContentType.change_cipher_spec, b"\x01")
    assert reader.next_record() == (
        ContentType.handshake,
        value("client_finished_message"),
    )

    client.send_application_data(value("client_app_payload"))
    assert client.data_to_send() == value("client_app_record")


# RFC 8448 section 4 ("Resumed 0-RTT Handshake"): the PSK from section 3's
# ticket, its binder, and the key schedule entered with that PSK.

RESUMED = json.loads(
    (Path(__file__).parent / "vectors" / "rfc8448-resumed.json").read_text()
)


def resumed_value(name: str) -> bytes:
    return bytes.fromhex(RESUMED["values"][name])


def resumed_message(name: str) -> bytes:
    return bytes.fromhex(RESUMED["handshake_messages"][name])


def test_resumption_psk_from_ticket_nonce() -> None:
    psk = ks.resumption_psk(SUITE, value("resumption_master_secret"), b"\x00\x00")
    assert psk == resumed_value("psk")


def test_psk_early_secret() -> None:
    schedule = ks.KeySchedule(SUITE, resumed_value("psk"))
    assert schedule.early_secret == resumed_value("early_secret")


def test_binder_key() -> None:
    schedule = ks.KeySchedule(SUITE, resumed_value("psk"))
    assert schedule.binder_key() == resumed_value("binder_key")
    finished_key = ks.finished_key(SUITE, schedule.binder_key())
    assert finished_key == resumed_value("binder_finished_key")


def test_binder_over_truncated_hello() -> None:
    hello = resumed_message("ClientHello")
    # The binders list is 2 length bytes, 1 binder length byte, 32 bytes.
    truncated_hash = ks.transcript_digest(SUITE, hello[:-35])
    assert truncated_hash == resumed_value("binder_hash")
    schedule = ks.KeySchedule(SUITE, resumed_value("psk"))
    assert schedule.binder(truncated_hash) == resumed_value("binder")


def test_offer_ticket_rebuilds_rfc_hello() -> None:
    hello = m.pull_client_hello(resumed_message("ClientHello")[4:])
    offered = m.pull_offered_psks(
        m.find_extension(hello.extensions, m.ExtensionType.pre_shared_key) or b""
    )
    identity = offered.identities[0]
    # Age 0 ms, so the obfuscated age is ticket_age_add itself.
    ticket = SessionTicket(
        ticket=identity.identity,
        psk=resumed_value("psk"),
        cipher_suite=ks.CipherSuite.TLS_AES_128_GCM_SHA256,
        ticket_age_add=identity.obfuscated_ticket_age,
        lifetime=60,
        received_at=5.0,
    )
    rebuilt = offer_ticket(without_ticket(hello), ticket, ks.Transcript(), 5.0)
    assert m.push_client_hello(rebuilt) == resumed_message("ClientHello")


def test_psk_handshake_secrets() -> None:
    schedule = ks.KeySchedule(SUITE, resumed_value("psk"))
    schedule.set_shared_secret(resumed_value("shared_secret"))
    assert schedule.handshake_secret == resumed_value("handshake_secret")
    transcript = ks.transcript_digest(
        SUITE, resumed_message("ClientHello") + resumed_message("ServerHello")
    )
    client_secret, server_secret = schedule.handshake_traffic_secrets(transcript)
    assert client_secret == resumed_value("client_hs_traffic_secret")
    assert server_secret == resumed_value("server_hs_traffic_secret")


def test_server_hello_selects_identity_zero() -> None:
    hello = m.pull_server_hello(resumed_message("ServerHello")[4:])
    data = m.find_extension(hello.extensions or [], m.ExtensionType.pre_shared_key)
    assert data is not None
    assert m.pull_uint16_extension(data, "pre_shared_key") == 0


def test_replayed_client_stores_rfc_psk() -> None:
    cache = SessionCache()
    client = ReplayedClient(
        TLSClientConfig("server", session_cache=cache, session_key="rfc")
    )
    client.start()
    server_flight = b"".join(message(name) for name in SERVER_FLIGHT[2:])
    server_cipher = RecordCipher(SUITE, value("server_hs_traffic_secret"))
    client.receive_data(
        plaintext_record(ContentType.handshake, message("ServerHello"))
        + server_cipher.seal(ContentType.handshake, server_flight)
    )
    application_cipher = RecordCipher(SUITE, value("server_ap_traffic_secret"))
    ticket_message = m.push_new_session_ticket(
        m.NewSessionTicket(30, 0, b"\x00\x00", b"ticket")
    )
    client.receive_data(application_cipher.seal(ContentType.handshake, ticket_message))
    stored = cache.take("rfc")
    assert stored is not None
    assert stored.psk == resumed_value("psk")
