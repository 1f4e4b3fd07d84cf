"""Property tests: every codec round-trips, and no input makes the client
raise anything but a TLSError."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pki import issue, make_ca
from scripted_server import ScriptedServer

from kmsproxy.tls import messages as m
from kmsproxy.tls.alerts import Alert, BadRecordMac, TLSError
from kmsproxy.tls.client import ClientConnection
from kmsproxy.tls.config import TLSClientConfig
from kmsproxy.tls.records import MAX_PLAINTEXT_LENGTH, ContentType

# Each property runs 200 examples: enough to reach every length branch of
# these small codecs, and the whole file stays under a few seconds.
EXAMPLES = 200

uint16 = st.integers(0, 2**16 - 1)
extension = st.tuples(uint16, st.binary(max_size=40))


def unique_extensions(min_size: int = 0) -> st.SearchStrategy[list[m.Extension]]:
    return st.lists(extension, min_size=min_size, max_size=6, unique_by=lambda e: e[0])


client_hellos = st.builds(
    m.ClientHello,
    random=st.binary(min_size=32, max_size=32),
    legacy_session_id=st.binary(max_size=32),
    cipher_suites=st.lists(uint16, min_size=1, max_size=10),
    extensions=unique_extensions(min_size=2),
    legacy_version=uint16,
    legacy_compression_methods=st.binary(min_size=1, max_size=4),
)
server_hellos = st.builds(
    m.ServerHello,
    random=st.binary(min_size=32, max_size=32),
    legacy_session_id_echo=st.binary(max_size=32),
    cipher_suite=uint16,
    extensions=unique_extensions() | st.none(),
    legacy_version=uint16,
    legacy_compression_method=st.integers(0, 255),
)
certificate_requests = st.builds(
    m.CertificateRequest,
    certificate_request_context=st.binary(max_size=255),
    extensions=unique_extensions(min_size=1),
)
certificates = st.builds(
    m.Certificate,
    certificate_request_context=st.binary(max_size=255),
    certificate_list=st.lists(
        st.builds(
            m.CertificateEntry,
            cert_data=st.binary(min_size=1, max_size=64),
            extensions=unique_extensions(),
        ),
        max_size=4,
    ),
)
new_session_tickets = st.builds(
    m.NewSessionTicket,
    ticket_lifetime=st.integers(0, 2**32 - 1),
    ticket_age_add=st.integers(0, 2**32 - 1),
    ticket_nonce=st.binary(max_size=255),
    ticket=st.binary(min_size=1, max_size=64),
    extensions=unique_extensions(),
)

Codec = tuple[st.SearchStrategy[Any], Callable[[bytes], Any], Callable[[Any], bytes]]

CODECS: dict[str, Codec] = {
    "ClientHello": (client_hellos, m.pull_client_hello, m.push_client_hello),
    "ServerHello": (server_hellos, m.pull_server_hello, m.push_server_hello),
    "EncryptedExtensions": (
        st.builds(m.EncryptedExtensions, unique_extensions()),
        m.pull_encrypted_extensions,
        m.push_encrypted_extensions,
    ),
    "CertificateRequest": (
        certificate_requests,
        m.pull_certificate_request,
        m.push_certificate_request,
    ),
    "Certificate": (certificates, m.pull_certificate, m.push_certificate),
    "CertificateVerify": (
        st.builds(m.CertificateVerify, uint16, st.binary(max_size=80)),
        m.pull_certificate_verify,
        m.push_certificate_verify,
    ),
    "NewSessionTicket": (
        new_session_tickets,
        m.pull_new_session_ticket,
        m.push_new_session_ticket,
    ),
    "KeyUpdate": (
        st.builds(m.KeyUpdate, st.sampled_from(m.KeyUpdateRequest)),
        m.pull_key_update,
        m.push_key_update,
    ),
}


@pytest.mark.parametrize("name", list(CODECS))
def test_codec_round_trip(name: str) -> None:
    strategy, pull, push = CODECS[name]

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(strategy)
    def round_trip(message: Any) -> None:
        wire = push(message)
        assert pull(wire[m.HANDSHAKE_HEADER_LENGTH :]) == message

    round_trip()


@pytest.mark.parametrize("name", list(CODECS))
def test_decoder_raises_only_tls_errors(name: str) -> None:
    _, pull, _ = CODECS[name]

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.binary(max_size=200))
    def decode(body: bytes) -> None:
        with contextlib.suppress(TLSError):
            pull(body)

    decode()


CA = make_ca()
SERVER = issue(CA, "server", dns_names=("server.test",))


def started_client() -> tuple[ClientConnection, ScriptedServer]:
    client = ClientConnection(TLSClientConfig("server.test"))
    server = ScriptedServer(SERVER)
    client.start()
    server.read_client_hello(client.data_to_send())
    return client, server


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_tls_errors_only(data: bytes) -> None:
    client, _ = started_client()
    with contextlib.suppress(TLSError):
        client.receive_data(data)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.data())
def test_mutated_flight_raises_tls_errors_only(data: st.DataObject) -> None:
    client, server = started_client()
    wire = bytearray(server.server_hello() + server.flight())
    # Positions are drawn independently of the flight's length, which varies
    # with the random ECDSA signature, so Hypothesis can replay an example.
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, 2**16)) % len(wire)
        wire[index] = data.draw(st.integers(0, 255))
    cut = len(wire) - data.draw(st.integers(0, 2**16)) % (len(wire) + 1)
    with contextlib.suppress(TLSError):
        client.receive_data(bytes(wire[:cut]))


# The encrypted flight, mutated before it is sealed, so that each example
# decrypts and reaches the handlers for EncryptedExtensions, Certificate,
# CertificateVerify and Finished.


def plaintext_flight(server: ScriptedServer) -> list[bytes]:
    """Build the server's encrypted handshake messages, valid and in order,
    adding each to the server's transcript as it would be sent."""
    builders: list[Callable[[], bytes]] = [
        lambda: m.push_encrypted_extensions(m.EncryptedExtensions([])),
        server.certificate_message,
        server.certificate_verify_message,
        server.finished_message,
    ]
    messages = []
    for build in builders:
        message = build()
        server.transcript.add(message)
        messages.append(message)
    return messages


def seal_handshake(server: ScriptedServer, plaintext: bytes, fragment: int) -> bytes:
    """Seal `plaintext` as handshake records of `fragment` bytes each."""
    records = b""
    for start in range(0, max(len(plaintext), 1), fragment):
        chunk = plaintext[start : start + fragment]
        records += server.protect(ContentType.handshake, chunk)
    return records


def feed_and_check_alert(
    client: ClientConnection, server: ScriptedServer, wire: bytes
) -> TLSError | None:
    """Feed `wire`; when the client raises an Alert, check it queued that
    alert for the server. Return the error, or None if none was raised."""
    error: TLSError | None = None
    try:
        client.receive_data(wire)
    except TLSError as raised:
        error = raised
    if isinstance(error, Alert):
        assert server.client_alert(client.data_to_send()) == error.description
    return error


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.data())
def test_mutated_plaintext_flight(data: st.DataObject) -> None:
    client, server = started_client()
    client.receive_data(server.server_hello())
    plaintext = bytearray(b"".join(plaintext_flight(server)))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, 2**16)) % len(plaintext)
        plaintext[index] = data.draw(st.integers(0, 255))
    cut = len(plaintext) - data.draw(st.integers(0, 64))
    fragment = data.draw(st.integers(1, MAX_PLAINTEXT_LENGTH))
    wire = seal_handshake(server, bytes(plaintext[: max(cut, 1)]), fragment)
    error = feed_and_check_alert(client, server, wire)
    assert not isinstance(error, BadRecordMac)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([2, 4, 5, 8, 11, 13, 15, 20, 24, 254]),
            st.binary(max_size=200),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_random_encrypted_messages(messages: list[tuple[int, bytes]]) -> None:
    client, server = started_client()
    client.receive_data(server.server_hello())
    plaintext = b"".join(
        bytes([message_type]) + len(body).to_bytes(3, "big") + body
        for message_type, body in messages
    )
    wire = seal_handshake(server, plaintext, MAX_PLAINTEXT_LENGTH)
    error = feed_and_check_alert(client, server, wire)
    assert not isinstance(error, BadRecordMac)


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        (0, "DecodeError"),
        (1, "BadCertificate"),
        (2, "DecryptError"),
        (3, "DecryptError"),
    ],
)
def test_mutation_reaches_handler(position: int, expected: str) -> None:
    # Flipping the last byte of one message must fail in that message's
    # handler, which shows the mutated examples above get past decryption.
    client, server = started_client()
    client.receive_data(server.server_hello())
    messages = plaintext_flight(server)
    target = bytearray(messages[position])
    if position == 0:
        target[3] += 1  # EncryptedExtensions longer than its content
    elif position == 1:
        # The leaf's DER starts after the 4-byte header, the empty context
        # (1 byte), the list length and the entry length (3 bytes each).
        target[11] = 0x31  # SET instead of the Certificate's SEQUENCE
    else:
        target[-1] ^= 0x01  # a signature or verify_data byte
    messages[position] = bytes(target)
    wire = seal_handshake(server, b"".join(messages), MAX_PLAINTEXT_LENGTH)
    error = feed_and_check_alert(client, server, wire)
    assert type(error).__name__ == expected
