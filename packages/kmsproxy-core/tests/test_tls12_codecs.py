"""The TLS 1.2 PRF, key block, record protection and message codecs.

The PRF is checked against OpenSSL's own (`openssl kdf TLS1-PRF`), an
implementation independent of ours; the record nonces against the
constructions of RFC 5288 and RFC 7905 computed by hand.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsproxy.tls import alerts
from kmsproxy.tls.config import TLSClientConfig
from kmsproxy.tls.records import ContentType
from kmsproxy.tls.tls12 import messages12 as m12
from kmsproxy.tls.tls12.client12 import ClientConnection12
from kmsproxy.tls.tls12.key_schedule12 import (
    SUITES12,
    CipherSuite12,
    extended_master_secret,
    key_block,
    prf,
)
from kmsproxy.tls.tls12.records12 import RecordCipher12, RecordLayer12

C = CipherSuite12

# Each property runs 200 examples: enough for every length branch of these
# small codecs while the file stays fast.
EXAMPLES = 200

# Time `openssl kdf` gets to print one result; it takes milliseconds.
OPENSSL_TIMEOUT_SECONDS = 10.0


def openssl_prf(digest: str, secret: bytes, seed: bytes, length: int) -> bytes:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl not found on PATH (install openssl)"
    result = subprocess.run(
        [
            openssl,
            "kdf",
            "-keylen",
            str(length),
            "-kdfopt",
            f"digest:{digest}",
            "-kdfopt",
            f"hexsecret:{secret.hex()}",
            "-kdfopt",
            f"hexseed:{seed.hex()}",
            "TLS1-PRF",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=OPENSSL_TIMEOUT_SECONDS,
    )
    return bytes.fromhex(result.stdout.strip().replace(":", ""))


# PRF and key derivation


@pytest.mark.parametrize(
    ("digest", "hash_name"), [("SHA256", "sha256"), ("SHA384", "sha384")]
)
@pytest.mark.parametrize("length", [12, 48, 100])
def test_prf_matches_openssl(digest: str, hash_name: str, length: int) -> None:
    secret = bytes(range(48))
    label, seed = b"key expansion", bytes(range(64))
    expected = openssl_prf(digest, secret, label + seed, length)
    assert prf(hash_name, secret, label, seed, length) == expected


def test_extended_master_secret_label() -> None:
    suite = SUITES12[C.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]
    secret, session_hash = bytes(32), bytes(range(48))
    expected = openssl_prf(
        "SHA384", secret, b"extended master secret" + session_hash, 48
    )
    assert extended_master_secret(suite, secret, session_hash) == expected


@pytest.mark.parametrize(
    ("suite", "key_length", "iv_length"),
    [
        (C.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, 16, 4),
        (C.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, 32, 4),
        (C.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256, 32, 12),
    ],
)
def test_key_block_layout(
    suite: CipherSuite12, key_length: int, iv_length: int
) -> None:
    parameters = SUITES12[suite]
    master, client_random, server_random = bytes(48), b"c" * 32, b"s" * 32
    keys = key_block(parameters, master, client_random, server_random)
    block = prf(
        parameters.hash_name,
        master,
        b"key expansion",
        server_random + client_random,
        2 * key_length + 2 * iv_length,
    )
    assert keys.client_key == block[:key_length]
    assert keys.server_key == block[key_length : 2 * key_length]
    assert keys.client_iv == block[2 * key_length : 2 * key_length + iv_length]
    assert keys.server_iv == block[2 * key_length + iv_length :]


# Record protection


def test_gcm_record_construction() -> None:
    suite = SUITES12[C.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    key, salt = bytes(range(16)), b"\xaa\xbb\xcc\xdd"
    cipher = RecordCipher12(suite, key, salt)
    cipher.sequence_number = 5
    record = cipher.seal(ContentType.application_data, b"hello")
    explicit = (5).to_bytes(8, "big")
    additional = explicit + bytes([23, 3, 3, 0, 5])
    expected = AESGCM(key).encrypt(salt + explicit, b"hello", additional)
    assert record[:5] == bytes([23, 3, 3]) + (8 + len(expected)).to_bytes(2, "big")
    assert record[5:13] == explicit
    assert record[13:] == expected


def test_chacha20_record_construction() -> None:
    suite = SUITES12[C.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256]
    key, iv = bytes(range(32)), bytes(range(100, 112))
    cipher = RecordCipher12(suite, key, iv)
    cipher.sequence_number = 7
    record = cipher.seal(ContentType.handshake, b"hello")
    nonce = bytes(a ^ b for a, b in zip(iv, (7).to_bytes(12, "big"), strict=True))
    additional = (7).to_bytes(8, "big") + bytes([22, 3, 3, 0, 5])
    expected = ChaCha20Poly1305(key).encrypt(nonce, b"hello", additional)
    assert record == bytes([22, 3, 3]) + len(expected).to_bytes(2, "big") + expected


@pytest.mark.parametrize("suite", list(C))
def test_record_round_trip(suite: CipherSuite12) -> None:
    parameters = SUITES12[suite]
    key, iv = bytes(parameters.key_length), bytes(parameters.fixed_iv_length)
    sender, receiver = RecordLayer12(), RecordLayer12()
    sender.write_cipher = RecordCipher12(parameters, key, iv)
    receiver.read_cipher = RecordCipher12(parameters, key, iv)
    receiver.feed(sender.encode(ContentType.application_data, bytes(20000)))
    first, second = receiver.next_record(), receiver.next_record()
    assert first == (ContentType.application_data, bytes(2**14))
    assert second == (ContentType.application_data, bytes(20000 - 2**14))
    assert receiver.next_record() is None


def test_records_framed_from_one_read() -> None:
    parameters = SUITES12[C.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    sender, receiver = RecordLayer12(), RecordLayer12()
    sender.write_cipher = RecordCipher12(parameters, bytes(16), bytes(4))
    receiver.read_cipher = RecordCipher12(parameters, bytes(16), bytes(4))
    # Five whole records and the first 10 bytes of a sixth, as one large
    # transport read delivers them.
    records = sender.encode(ContentType.application_data, bytes(5 * 2**14))
    partial = sender.encode(ContentType.application_data, b"next")[:10]
    receiver.feed(records + partial)
    contents = [receiver.next_record() for _ in range(5)]
    assert contents == [(ContentType.application_data, bytes(2**14))] * 5
    assert receiver.next_record() is None
    assert receiver.take_buffered() == partial


def test_record_type_is_authenticated() -> None:
    parameters = SUITES12[C.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    sender, receiver = RecordLayer12(), RecordLayer12()
    sender.write_cipher = RecordCipher12(parameters, bytes(16), bytes(4))
    receiver.read_cipher = RecordCipher12(parameters, bytes(16), bytes(4))
    record = bytearray(sender.encode(ContentType.application_data, b"data"))
    record[0] = ContentType.handshake
    receiver.feed(bytes(record))
    with pytest.raises(alerts.BadRecordMac):
        receiver.next_record()


def test_short_protected_record() -> None:
    parameters = SUITES12[C.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    receiver = RecordLayer12()
    receiver.read_cipher = RecordCipher12(parameters, bytes(16), bytes(4))
    receiver.feed(bytes([23, 3, 3, 0, 23]) + bytes(23))
    with pytest.raises(alerts.BadRecordMac, match="too short"):
        receiver.next_record()


def test_unknown_content_type() -> None:
    receiver = RecordLayer12()
    receiver.feed(bytes([24, 3, 3, 0, 1, 0]))
    with pytest.raises(alerts.UnexpectedMessage):
        receiver.next_record()


# Message codecs

binary255 = st.binary(min_size=1, max_size=255)
uint16 = st.integers(0, 2**16 - 1)
names = st.lists(st.binary(min_size=1, max_size=40), max_size=4)


@settings(max_examples=EXAMPLES)
@given(
    st.builds(m12.ServerKeyExchange, uint16, binary255, uint16, st.binary(max_size=600))
)
def test_server_key_exchange_round_trip(message: m12.ServerKeyExchange) -> None:
    encoded = m12.push_server_key_exchange(message)
    assert m12.pull_server_key_exchange(encoded[4:]) == message


@settings(max_examples=EXAMPLES)
@given(
    st.builds(
        m12.CertificateRequest12,
        binary255,
        st.lists(uint16, min_size=1, max_size=20),
        names,
    )
)
def test_certificate_request_round_trip(message: m12.CertificateRequest12) -> None:
    encoded = m12.push_certificate_request12(message)
    assert m12.pull_certificate_request12(encoded[4:]) == message


@settings(max_examples=EXAMPLES)
@given(st.builds(m12.Certificate12, names))
def test_certificate_round_trip(message: m12.Certificate12) -> None:
    encoded = m12.push_certificate12(message)
    assert m12.pull_certificate12(encoded[4:]) == message


@settings(max_examples=EXAMPLES)
@given(
    st.builds(
        m12.NewSessionTicket12, st.integers(0, 2**32 - 1), st.binary(max_size=300)
    )
)
def test_new_session_ticket_round_trip(message: m12.NewSessionTicket12) -> None:
    encoded = m12.push_new_session_ticket12(message)
    assert m12.pull_new_session_ticket12(encoded[4:]) == message


@settings(max_examples=EXAMPLES)
@given(st.binary(max_size=300))
def test_decoders_raise_only_alerts(data: bytes) -> None:
    decoders = [
        m12.pull_server_key_exchange,
        m12.pull_certificate_request12,
        m12.pull_certificate12,
        m12.pull_new_session_ticket12,
        m12.pull_client_key_exchange,
        m12.pull_finished12,
        m12.pull_renegotiation_info,
        m12.pull_ec_point_formats,
    ]
    for decoder in decoders:
        with contextlib.suppress(alerts.Alert):
            decoder(data)


@settings(max_examples=EXAMPLES)
@given(st.lists(st.binary(max_size=300), max_size=4))
def test_client_raises_only_tls_errors(chunks: list[bytes]) -> None:
    client = ClientConnection12(TLSClientConfig("server.test"))
    client.start()
    with contextlib.suppress(alerts.TLSError):
        for chunk in chunks:
            client.receive_data(b"\x16\x03\x03" + chunk)


@settings(max_examples=EXAMPLES)
@given(st.binary(min_size=1, max_size=400))
def test_server_hello_body_raises_only_alerts(body: bytes) -> None:
    client = ClientConnection12(TLSClientConfig("server.test"))
    client.start()
    message = m12.encode_handshake12(m12.HandshakeType12.server_hello, body)
    record = bytes([22, 3, 3]) + len(message).to_bytes(2, "big") + message
    with contextlib.suppress(alerts.Alert):
        client.receive_data(record)


def test_certificate_request_empty_types() -> None:
    body = b"\x00" + b"\x00\x02\x04\x03" + b"\x00\x00"
    with pytest.raises(alerts.DecodeError):
        m12.pull_certificate_request12(body)


def test_hello_request_with_body() -> None:
    with pytest.raises(alerts.DecodeError):
        m12.pull_empty(b"\x00", "HelloRequest")
