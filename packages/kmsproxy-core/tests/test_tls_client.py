"""Byte-level specification of the sans-IO client against a scripted server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from peers import start_openssl_server
from pki import Issued, issue, make_ca
from scripted_server import ScriptedServer, complete_handshake, plaintext_record
from test_interop_peers import make_files, open_tls
from tls_harness import events

from kmsproxy.signer import (
    SignatureScheme,
    SoftwareSigner,
    sign_with_private_key,
    verify_signature,
)
from kmsproxy.tls import alerts
from kmsproxy.tls import messages as m
from kmsproxy.tls.alerts import AlertDescription
from kmsproxy.tls.client import (
    KEY_UPDATE_AFTER_RECORDS,
    MAX_CHANGE_CIPHER_SPEC_RECORDS,
    ClientConnection,
    State,
)
from kmsproxy.tls.config import ClientIdentity, TLSClientConfig
from kmsproxy.tls.events import (
    ApplicationData,
    CloseNotifyReceived,
    Event,
    HandshakeComplete,
    SignatureRequested,
)
from kmsproxy.tls.key_schedule import (
    CipherSuite,
    finished_verify_data,
    next_traffic_secret,
)
from kmsproxy.tls.limits import (
    EMPTY_RECORD_CREDIT_BYTES,
    KEY_UPDATE_CREDIT_BYTES,
    MAX_EMPTY_RECORDS,
    MAX_KEY_UPDATES,
)
from kmsproxy.tls.records import ContentType, RecordCipher
from kmsproxy.tls.tls12.client12 import State12
from kmsproxy.tls.tls12.key_schedule12 import CIPHER_SUITES12, CipherSuite12
from kmsproxy.tls.tls12.messages12 import ExtensionType12
from kmsproxy.tls.verify import CLIENT_CONTEXT, TrustStore, signed_content

CA = make_ca()
SERVER = issue(CA, "server", dns_names=("server.test",))
CLIENT = issue(CA, "client", client=True)
OTHER_CA = make_ca("other CA")
OTHER_CLIENT = issue(OTHER_CA, "other client", client=True)

E = m.ExtensionType

# Time s_server gets to send its alert after our Finished. A local s_server
# replies within milliseconds, so 10 s only guards against a hang.
PEER_REPLY_TIMEOUT_SECONDS = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def identity(issued: Issued) -> ClientIdentity:
    return ClientIdentity(tuple(issued.chain), SoftwareSigner(issued.key, "file:test"))


def new_client(**settings: object) -> ClientConnection:
    config = TLSClientConfig("server.test", **settings)  # type: ignore[arg-type]
    return ClientConnection(config)


def started(**settings: object) -> tuple[ClientConnection, ScriptedServer]:
    client = new_client(**settings)
    server = ScriptedServer(SERVER)
    client.start()
    server.read_client_hello(client.data_to_send())
    return client, server


def expect_alert(
    client: ClientConnection,
    data: bytes,
    error: type[alerts.Alert],
    server: ScriptedServer | None = None,
) -> alerts.Alert:
    """Feed `data`, expect `error`, and check the alert record the client
    queued carries the same description."""
    with pytest.raises(error) as caught:
        client.receive_data(data)
    assert client.state == State.CLOSED
    output = client.data_to_send()
    if server is not None:
        assert server.client_alert(output) == caught.value.description
    else:
        assert output[0] == ContentType.alert
        assert output[-1] == caught.value.description
    return caught.value


# The ClientHello


def test_client_hello_shape() -> None:
    _client, server = started(alpn_protocols=["h2", "http/1.1"])
    hello = server.client_hello
    assert hello is not None
    shares = m.pull_key_share_client(server.client_extension(E.key_share) or b"")
    alpn = m.pull_alpn(
        server.client_extension(E.application_layer_protocol_negotiation) or b""
    )
    assert len(hello.legacy_session_id) == 32
    assert hello.cipher_suites == [0x1301, 0x1302, 0x1303, *CIPHER_SUITES12]
    assert [share.group for share in shares] == [
        m.NamedGroup.X25519MLKEM768,
        m.NamedGroup.x25519,
    ]
    assert server.client_extension(E.supported_versions) == b"\x04\x03\x04\x03\x03"
    assert server.client_extension(ExtensionType12.extended_master_secret) == b""
    assert server.client_extension(ExtensionType12.renegotiation_info) == b"\x00"
    assert server.client_extension(E.server_name) == m.push_server_name("server.test")
    assert alpn == [b"h2", b"http/1.1"]
    assert server.client_extension(E.post_handshake_auth) is None


def test_client_hello_no_sni_for_ip() -> None:
    client = ClientConnection(TLSClientConfig("127.0.0.1"))
    server = ScriptedServer(SERVER)
    client.start()
    server.read_client_hello(client.data_to_send())
    assert server.client_extension(E.server_name) is None


def test_config_rejects_bracketed_ip() -> None:
    with pytest.raises(ValueError, match="without brackets"):
        TLSClientConfig("[::1]")


# A valid handshake


def test_handshake_completes() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    records = complete_handshake(client, server)
    assert [type(e) for e in events(client)] == [HandshakeComplete]
    assert records[-1][0] == ContentType.handshake
    assert records[-1][1][0] == m.HandshakeType.finished
    assert client.peer_chain == SERVER.chain
    assert client.client_identity is None
    assert client.cipher_suite == "TLS_AES_128_GCM_SHA256"


def test_client_finished_verifies() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    records = complete_handshake(client, server)
    expected = finished_verify_data(
        server.suite, server.handshake_secrets[0], server.transcript.digest()
    )
    assert records[-1][1] == m.push_finished(m.Finished(expected))


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_each_cipher_suite(suite: CipherSuite) -> None:
    client = new_client()
    server = ScriptedServer(SERVER, suite_code=suite)
    complete_handshake(client, server)
    assert client.handshake_complete
    assert client.cipher_suite == suite.name


def test_application_data_both_ways() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    events(client)
    client.send_application_data(b"ping")
    assert server.read_client_records(client.data_to_send()) == [
        (ContentType.application_data, b"ping")
    ]
    client.receive_data(server.protect(ContentType.application_data, b"pong", 7))
    assert events(client) == [ApplicationData(b"pong")]


def test_large_write_splits_records() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    client.send_application_data(bytes(40000))
    records = server.read_client_records(client.data_to_send())
    assert [len(content) for _, content in records] == [16384, 16384, 7232]


def test_fragmented_handshake_message() -> None:
    client, server = started()
    hello = server.server_hello()
    flight = server.encrypted_extensions()
    certificate = server.certificate_message()
    server.transcript.add(certificate)
    pieces = [certificate[:3], certificate[3:100], certificate[100:]]
    fragments = b"".join(server.protect(ContentType.handshake, p) for p in pieces)
    client.receive_data(hello + flight + fragments)
    client.receive_data(server.certificate_verify() + server.finished())
    assert client.handshake_complete


def test_byte_at_a_time() -> None:
    client, server = started()
    wire = server.server_hello() + server.flight()
    for index in range(len(wire)):
        client.receive_data(wire[index : index + 1])
    assert client.handshake_complete


def test_change_cipher_spec_ignored() -> None:
    client, server = started()
    ccs = plaintext_record(ContentType.change_cipher_spec, b"\x01")
    client.receive_data(server.server_hello() + ccs + server.flight())
    assert client.handshake_complete


def test_alpn_selected() -> None:
    client, server = started(alpn_protocols=["h2", "http/1.1"])
    alpn = (E.application_layer_protocol_negotiation, m.push_alpn([b"http/1.1"]))
    wire = server.server_hello() + server.encrypted_extensions([alpn])
    client.receive_data(wire + server.certificate() + server.certificate_verify())
    client.receive_data(server.finished())
    assert client.alpn_protocol == "http/1.1"


def test_trust_store_accepts_chain() -> None:
    client, server = started(trust=TrustStore([CA.cert]))
    client.receive_data(server.server_hello() + server.flight())
    assert client.handshake_complete


# HelloRetryRequest


def test_hello_retry_request_to_p384() -> None:
    client, server = started()
    first = server.client_hello
    assert first is not None
    cookie = b"opaque state"
    client.receive_data(server.hello_retry_request(m.NamedGroup.secp384r1, cookie))
    output = client.data_to_send()
    second = server.read_second_client_hello(output)
    shares = m.pull_key_share_client(server.client_extension(E.key_share) or b"")
    # Middlebox compatibility mode: change_cipher_spec before ClientHello2.
    assert output[:6] == plaintext_record(ContentType.change_cipher_spec, b"\x01")
    assert [share.group for share in shares] == [m.NamedGroup.secp384r1]
    assert m.pull_cookie(server.client_extension(E.cookie) or b"") == cookie
    assert second.random == first.random
    assert second.legacy_session_id == first.legacy_session_id
    assert second.cipher_suites == first.cipher_suites
    client.receive_data(server.server_hello() + server.flight())
    assert client.handshake_complete


def handshake_messages(wire: bytes) -> list[bytes]:
    """Split plaintext records into handshake messages, skipping CCS; each
    message here fits in one record."""
    messages = []
    while wire:
        length = int.from_bytes(wire[3:5], "big")
        if wire[0] == ContentType.handshake:
            messages.append(wire[5 : 5 + length])
        wire = wire[5 + length :]
    return messages


def test_hello_retry_transcript_by_hand() -> None:
    # RFC 8446 section 4.4.1: after a HelloRetryRequest the transcript
    # starts with message_hash (type 254, a 3-byte length, then
    # Hash(ClientHello1)), followed by the HelloRetryRequest, ClientHello2
    # and ServerHello. Computed with hashlib, independently of Transcript.
    client = new_client()
    server = ScriptedServer(SERVER)
    client.start()
    first_wire = client.data_to_send()
    server.read_client_hello(first_wire)
    retry_wire = server.hello_retry_request(m.NamedGroup.secp384r1)
    client.receive_data(retry_wire)
    second_wire = client.data_to_send()
    server.read_second_client_hello(second_wire)
    hello_wire = server.server_hello()
    client.receive_data(hello_wire)

    [client_hello1] = handshake_messages(first_wire)
    [retry] = handshake_messages(retry_wire)
    [client_hello2] = handshake_messages(second_wire)
    [server_hello] = handshake_messages(hello_wire)
    digest = hashlib.sha256(client_hello1).digest()
    message_hash = bytes([254, 0, 0, len(digest)]) + digest
    expected = hashlib.sha256(
        message_hash + retry + client_hello2 + server_hello
    ).digest()
    assert client.cipher_suite == "TLS_AES_128_GCM_SHA256"
    assert client._transcript.digest() == expected


def test_second_hello_retry_request() -> None:
    client, server = started()
    client.receive_data(server.hello_retry_request(m.NamedGroup.secp384r1))
    server.read_second_client_hello(client.data_to_send())
    retry = server.hello_retry_request(None, b"again")
    expect_alert(client, retry, alerts.UnexpectedMessage)


def test_retry_for_group_already_shared() -> None:
    client, server = started()
    retry = server.hello_retry_request(m.NamedGroup.x25519)
    expect_alert(client, retry, alerts.IllegalParameter)


def test_retry_changing_nothing() -> None:
    client, server = started()
    expect_alert(client, server.hello_retry_request(None), alerts.IllegalParameter)


def test_server_hello_suite_differs_from_retry() -> None:
    client, server = started()
    client.receive_data(server.hello_retry_request(m.NamedGroup.secp384r1))
    server.read_second_client_hello(client.data_to_send())
    message, _ = server.server_hello_message()
    hello = m.pull_server_hello(message[4:])
    hello.cipher_suite = CipherSuite.TLS_AES_256_GCM_SHA384
    wire = plaintext_record(ContentType.handshake, m.push_server_hello(hello))
    expect_alert(client, wire, alerts.IllegalParameter)


# ServerHello violations


def server_hello_with(server: ScriptedServer, **changes: object) -> bytes:
    message, _ = server.server_hello_message()
    hello = m.pull_server_hello(message[4:])
    for name, value in changes.items():
        setattr(hello, name, value)
    return plaintext_record(ContentType.handshake, m.push_server_hello(hello))


def test_suite_not_offered() -> None:
    client, server = started()
    wire = server_hello_with(server, cipher_suite=0x1304)
    expect_alert(client, wire, alerts.IllegalParameter)


def test_session_id_echo_mismatch() -> None:
    client, server = started()
    wire = server_hello_with(server, legacy_session_id_echo=bytes(32))
    expect_alert(client, wire, alerts.IllegalParameter)


def test_tls12_server_hello_hands_over() -> None:
    client, server = started()
    extensions = [
        (ExtensionType12.renegotiation_info, b"\x00"),
        (ExtensionType12.extended_master_secret, b""),
    ]
    wire = server_hello_with(
        server,
        extensions=extensions,
        cipher_suite=CipherSuite12.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        legacy_session_id_echo=b"",
    )
    client.receive_data(wire)
    assert client.state == State.HANDED_OVER
    assert client.tls12 is not None
    assert client.tls12.version == "TLSv1.2"
    assert client.tls12.state == State12.WAIT_CERTIFICATE


def test_tls12_server_hello_without_ems() -> None:
    client, server = started()
    wire = server_hello_with(
        server,
        extensions=None,
        cipher_suite=CipherSuite12.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        legacy_session_id_echo=b"",
    )
    error = expect_alert(client, wire, alerts.HandshakeFailure)
    assert "extended master secret" in str(error)


def test_hello_retry_request_without_supported_versions() -> None:
    client, server = started()
    wire = server_hello_with(server, extensions=[], random=m.HELLO_RETRY_REQUEST_RANDOM)
    expect_alert(client, wire, alerts.MissingExtension)


def test_tls12_after_hello_retry_request() -> None:
    client, server = started()
    client.receive_data(server.hello_retry_request(m.NamedGroup.secp256r1))
    server.read_second_client_hello(client.data_to_send())
    wire = server_hello_with(
        server,
        extensions=None,
        cipher_suite=CipherSuite12.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    )
    expect_alert(client, wire, alerts.IllegalParameter)


def test_tls12_downgrade_sentinel() -> None:
    client, server = started()
    random = bytes(24) + m.DOWNGRADE_SENTINELS[0]
    wire = server_hello_with(server, extensions=[], random=random)
    expect_alert(client, wire, alerts.IllegalParameter)


def test_supported_versions_tls12() -> None:
    client, server = started()
    message, _ = server.server_hello_message()
    hello = m.pull_server_hello(message[4:])
    assert hello.extensions is not None
    hello.extensions[0] = (E.supported_versions, b"\x03\x03")
    wire = plaintext_record(ContentType.handshake, m.push_server_hello(hello))
    expect_alert(client, wire, alerts.IllegalParameter)


def test_missing_key_share() -> None:
    client, server = started()
    wire = server_hello_with(server, extensions=[(E.supported_versions, b"\x03\x04")])
    expect_alert(client, wire, alerts.MissingExtension)


def test_duplicate_extension() -> None:
    client, server = started()
    message, _ = server.server_hello_message()
    hello = m.pull_server_hello(message[4:])
    assert hello.extensions is not None
    hello.extensions.append(hello.extensions[0])
    wire = plaintext_record(ContentType.handshake, m.push_server_hello(hello))
    expect_alert(client, wire, alerts.IllegalParameter)


def test_unsolicited_pre_shared_key() -> None:
    client, server = started()
    message, _ = server.server_hello_message()
    hello = m.pull_server_hello(message[4:])
    assert hello.extensions is not None
    hello.extensions.append((E.pre_shared_key, b"\x00\x00"))
    wire = plaintext_record(ContentType.handshake, m.push_server_hello(hello))
    expect_alert(client, wire, alerts.UnsupportedExtension)


def test_server_name_in_server_hello() -> None:
    client, server = started()
    message, _ = server.server_hello_message()
    hello = m.pull_server_hello(message[4:])
    assert hello.extensions is not None
    hello.extensions.append((E.server_name, b""))
    wire = plaintext_record(ContentType.handshake, m.push_server_hello(hello))
    expect_alert(client, wire, alerts.IllegalParameter)


def test_invalid_key_share_point() -> None:
    client, server = started()
    message, _ = server.server_hello_message()
    hello = m.pull_server_hello(message[4:])
    assert hello.extensions is not None
    share = m.push_key_share_server(
        m.KeyShareEntry(m.NamedGroup.secp256r1, b"\x04" + bytes(64))
    )
    hello.extensions[1] = (E.key_share, share)
    wire = plaintext_record(ContentType.handshake, m.push_server_hello(hello))
    expect_alert(client, wire, alerts.IllegalParameter)


def test_truncated_server_hello() -> None:
    client, server = started()
    message, _ = server.server_hello_message()
    short = m.encode_handshake(m.HandshakeType.server_hello, message[4:40])
    expect_alert(client, plaintext_record(22, short), alerts.DecodeError)


def test_overlong_session_id() -> None:
    client, server = started()
    message, _ = server.server_hello_message()
    body = bytearray(message[4:])
    body[34] = 33  # legacy_session_id_echo is opaque <0..32>
    wire = plaintext_record(
        22, m.encode_handshake(m.HandshakeType.server_hello, bytes(body))
    )
    expect_alert(client, wire, alerts.DecodeError)


def test_trailing_bytes_after_server_hello() -> None:
    client, server = started()
    message, _ = server.server_hello_message()
    body = message[4:] + b"\x00"
    wire = plaintext_record(22, m.encode_handshake(m.HandshakeType.server_hello, body))
    expect_alert(client, wire, alerts.DecodeError)


def test_handshake_spanning_key_change() -> None:
    client, server = started()
    message, _ = server.server_hello_message()
    # The first bytes of the next message share ServerHello's record.
    wire = plaintext_record(22, message + b"\x08\x00")
    expect_alert(client, wire, alerts.UnexpectedMessage)


def test_oversized_handshake_message() -> None:
    client, _ = started()
    header = bytes([m.HandshakeType.server_hello]) + (200 * 1024).to_bytes(3, "big")
    expect_alert(client, plaintext_record(22, header), alerts.DecodeError)


# Records


def test_plaintext_record_overflow() -> None:
    client, _ = started()
    header = bytes([22, 3, 3]) + (2**14 + 1).to_bytes(2, "big")
    expect_alert(client, header, alerts.RecordOverflow)


def test_protected_record_overflow() -> None:
    client, server = started()
    header = bytes([23, 3, 3]) + (2**14 + 257).to_bytes(2, "big")
    expect_alert(client, server.server_hello() + header, alerts.RecordOverflow, server)


def test_protected_record_at_limit_is_decrypted() -> None:
    client, server = started()
    # 2^14 + 256 bytes: within the limit, so the client tries to decrypt it.
    record = bytes([23, 3, 3]) + (2**14 + 256).to_bytes(2, "big") + bytes(2**14 + 256)
    expect_alert(client, server.server_hello() + record, alerts.BadRecordMac, server)


def test_tampered_record() -> None:
    client, server = started()
    record = bytearray(server.server_hello() + server.encrypted_extensions())
    record[-1] ^= 1
    expect_alert(client, bytes(record), alerts.BadRecordMac, server)


def test_unknown_record_type() -> None:
    client, _ = started()
    expect_alert(client, plaintext_record(24, b"\x00"), alerts.UnexpectedMessage)


def test_application_data_before_finished() -> None:
    client, server = started()
    wire = server.server_hello() + server.protect(ContentType.application_data, b"x")
    expect_alert(client, wire, alerts.UnexpectedMessage, server)


def test_bad_change_cipher_spec() -> None:
    client, _server = started()
    ccs = plaintext_record(ContentType.change_cipher_spec, b"\x02")
    expect_alert(client, ccs, alerts.UnexpectedMessage)


def test_change_cipher_spec_flood() -> None:
    client, _server = started()
    ccs = plaintext_record(ContentType.change_cipher_spec, b"\x01")
    flood = ccs * (MAX_CHANGE_CIPHER_SPEC_RECORDS + 1)
    expect_alert(client, flood, alerts.UnexpectedMessage)


def test_change_cipher_spec_after_finished() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    ccs = plaintext_record(ContentType.change_cipher_spec, b"\x01")
    expect_alert(client, ccs, alerts.UnexpectedMessage, server)


def test_alert_inside_fragmented_message() -> None:
    client, server = started()
    certificate = server.certificate_message()
    wire = server.server_hello() + server.encrypted_extensions()
    wire += server.protect(ContentType.handshake, certificate[:10])
    wire += server.protect(ContentType.alert, b"\x02\x28")
    expect_alert(client, wire, alerts.UnexpectedMessage, server)


# Message order and content


def test_certificate_before_encrypted_extensions() -> None:
    client, server = started()
    wire = server.server_hello() + server.certificate()
    expect_alert(client, wire, alerts.UnexpectedMessage, server)


def test_finished_before_certificate_verify() -> None:
    client, server = started()
    wire = server.server_hello() + server.encrypted_extensions() + server.certificate()
    expect_alert(client, wire + server.finished(), alerts.UnexpectedMessage, server)


def test_second_server_hello() -> None:
    client, server = started()
    hello = server.server_hello()
    client.receive_data(hello)
    again, _ = server.server_hello_message()
    wire = server.protect(ContentType.handshake, again)
    expect_alert(client, wire, alerts.UnexpectedMessage, server)


def test_unsolicited_record_size_limit() -> None:
    client, server = started()
    limit = (E.record_size_limit, (2**14).to_bytes(2, "big"))
    wire = server.server_hello() + server.encrypted_extensions([limit])
    expect_alert(client, wire, alerts.UnsupportedExtension, server)


def test_unsolicited_early_data() -> None:
    client, server = started()
    wire = server.server_hello() + server.encrypted_extensions([(E.early_data, b"")])
    expect_alert(client, wire, alerts.UnsupportedExtension, server)


def test_key_share_in_encrypted_extensions() -> None:
    client, server = started()
    wire = server.server_hello() + server.encrypted_extensions([(E.key_share, b"")])
    expect_alert(client, wire, alerts.IllegalParameter, server)


def test_alpn_not_offered() -> None:
    client, server = started(alpn_protocols=["http/1.1"])
    alpn = (E.application_layer_protocol_negotiation, m.push_alpn([b"h2"]))
    wire = server.server_hello() + server.encrypted_extensions([alpn])
    expect_alert(client, wire, alerts.IllegalParameter, server)


def test_empty_certificate() -> None:
    client, server = started()
    wire = server.server_hello() + server.encrypted_extensions()
    wire += server.handshake(m.push_certificate(m.Certificate(b"", [])))
    expect_alert(client, wire, alerts.DecodeError, server)


def test_certificate_not_der() -> None:
    client, server = started()
    junk = m.push_certificate(m.Certificate(b"", [m.CertificateEntry(b"\x30\x03abc")]))
    wire = (
        server.server_hello() + server.encrypted_extensions() + server.handshake(junk)
    )
    expect_alert(client, wire, alerts.BadCertificate, server)


def test_certificate_request_without_signature_algorithms() -> None:
    client, server = started()
    request = m.push_certificate_request(
        m.CertificateRequest(
            b"",
            [
                (
                    E.certificate_authorities,
                    m.push_certificate_authorities([b"\x30\x00"]),
                )
            ],
        )
    )
    wire = server.server_hello() + server.encrypted_extensions()
    expect_alert(
        client, wire + server.handshake(request), alerts.MissingExtension, server
    )


def test_bad_certificate_verify_signature() -> None:
    client, server = started()
    wire = server.server_hello() + server.encrypted_extensions() + server.certificate()
    message = bytearray(server.certificate_verify_message())
    message[-5] ^= 0x40
    expect_alert(
        client, wire + server.handshake(bytes(message)), alerts.DecryptError, server
    )


def test_certificate_verify_scheme_not_offered() -> None:
    client, server = started()
    wire = server.server_hello() + server.encrypted_extensions() + server.certificate()
    verify = m.pull_certificate_verify(server.certificate_verify_message()[4:])
    verify.algorithm = SignatureScheme.rsa_pkcs1_sha256
    message = m.push_certificate_verify(verify)
    expect_alert(
        client, wire + server.handshake(message), alerts.IllegalParameter, server
    )


def test_certificate_verify_wrong_curve_scheme() -> None:
    client, server = started()
    wire = server.server_hello() + server.encrypted_extensions() + server.certificate()
    verify = m.pull_certificate_verify(server.certificate_verify_message()[4:])
    verify.algorithm = SignatureScheme.ecdsa_secp384r1_sha384
    message = m.push_certificate_verify(verify)
    expect_alert(
        client, wire + server.handshake(message), alerts.IllegalParameter, server
    )


def test_bad_finished() -> None:
    client, server = started()
    wire = server.server_hello() + server.encrypted_extensions() + server.certificate()
    wire += server.certificate_verify()
    finished = bytearray(server.finished_message())
    finished[-1] ^= 1
    expect_alert(
        client, wire + server.handshake(bytes(finished)), alerts.DecryptError, server
    )


def test_finished_wrong_length() -> None:
    client, server = started()
    wire = server.server_hello() + server.encrypted_extensions() + server.certificate()
    wire += server.certificate_verify()
    short = m.encode_handshake(m.HandshakeType.finished, bytes(31))
    expect_alert(client, wire + server.handshake(short), alerts.DecodeError, server)


# Alerts from the server


def test_server_alert_raises() -> None:
    client, _ = started()
    with pytest.raises(alerts.AlertReceived) as caught:
        client.receive_data(plaintext_record(ContentType.alert, b"\x02\x28"))
    assert caught.value.description == AlertDescription.handshake_failure
    assert str(caught.value) == "server sent alert handshake_failure (40)"
    assert client.data_to_send() == b""


def test_alert_record_wrong_length() -> None:
    client, _ = started()
    expect_alert(
        client, plaintext_record(ContentType.alert, b"\x02\x28\x00"), alerts.DecodeError
    )


def test_close_notify_after_handshake() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    events(client)
    client.receive_data(server.protect(ContentType.alert, b"\x01\x00"))
    assert events(client) == [CloseNotifyReceived()]
    client.send_application_data(b"still open")
    assert client.data_to_send()


def test_close_notify_sent() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    client.send_close_notify()
    assert server.read_client_records(client.data_to_send()) == [
        (ContentType.alert, b"\x01\x00")
    ]


# Post-handshake messages


def test_key_update_requested() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    update = m.push_key_update(m.KeyUpdate(m.KeyUpdateRequest.update_requested))
    client.receive_data(server.protect(ContentType.handshake, update))
    answer = server.read_client_records(client.data_to_send())
    assert answer == [
        (
            ContentType.handshake,
            m.push_key_update(m.KeyUpdate(m.KeyUpdateRequest.update_not_requested)),
        )
    ]

    # Both directions now use application_traffic_secret_1.
    client_secret, server_secret = server.application_secrets
    server.server_cipher = RecordCipher(
        server.suite, next_traffic_secret(server.suite, server_secret)
    )
    server.client_reader.read_cipher = RecordCipher(
        server.suite, next_traffic_secret(server.suite, client_secret)
    )
    client.receive_data(server.protect(ContentType.application_data, b"after"))
    client.send_application_data(b"reply")
    assert events(client)[-1] == ApplicationData(b"after")
    assert server.read_client_records(client.data_to_send()) == [
        (ContentType.application_data, b"reply")
    ]


def test_key_update_before_key_exhaustion() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    write_cipher = client._records.write_cipher
    assert write_cipher is not None
    server_reader = server.client_reader.read_cipher
    assert server_reader is not None
    write_cipher.sequence_number = KEY_UPDATE_AFTER_RECORDS
    server_reader.sequence_number = KEY_UPDATE_AFTER_RECORDS
    client.send_application_data(b"next")
    output = client.data_to_send()

    update = server.read_client_records(output[: 5 + 5 + 1 + 16])
    client_secret = next_traffic_secret(server.suite, server.application_secrets[0])
    server.client_reader.read_cipher = RecordCipher(server.suite, client_secret)
    data = server.read_client_records(output[5 + 5 + 1 + 16 :])
    not_requested = m.KeyUpdate(m.KeyUpdateRequest.update_not_requested)
    assert update == [(ContentType.handshake, m.push_key_update(not_requested))]
    assert data == [(ContentType.application_data, b"next")]


def test_key_update_invalid_request() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    update = m.encode_handshake(m.HandshakeType.key_update, b"\x02")
    expect_alert(
        client,
        server.protect(ContentType.handshake, update),
        alerts.IllegalParameter,
        server,
    )


# Floods of records that carry no application data


class KeyUpdatingServer:
    """Sends KeyUpdates through a ScriptedServer and follows its own key."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.secret = server.application_secrets[1]

    def key_update(self) -> bytes:
        update = m.KeyUpdate(m.KeyUpdateRequest.update_not_requested)
        record = self.server.protect(ContentType.handshake, m.push_key_update(update))
        self.secret = next_traffic_secret(self.server.suite, self.secret)
        self.server.server_cipher = RecordCipher(self.server.suite, self.secret)
        return record


def connected_pair() -> tuple[ClientConnection, ScriptedServer]:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    events(client)
    return client, server


def test_key_update_flood() -> None:
    client, server = connected_pair()
    updater = KeyUpdatingServer(server)
    for _ in range(MAX_KEY_UPDATES):
        client.receive_data(updater.key_update())
    error = expect_alert(client, updater.key_update(), alerts.UnexpectedMessage, server)
    assert f"more than {MAX_KEY_UPDATES} KeyUpdates" in str(error)


def test_key_update_flood_interleaved() -> None:
    # One data byte between bursts must not reset the count.
    client, server = connected_pair()
    updater = KeyUpdatingServer(server)
    for _ in range(MAX_KEY_UPDATES):
        client.receive_data(updater.key_update())
    client.receive_data(server.protect(ContentType.application_data, b"x"))
    expect_alert(client, updater.key_update(), alerts.UnexpectedMessage, server)


def test_key_updates_paid_by_data() -> None:
    client, server = connected_pair()
    updater = KeyUpdatingServer(server)
    data = b"d" * KEY_UPDATE_CREDIT_BYTES
    for _ in range(3):
        for _ in range(MAX_KEY_UPDATES):
            client.receive_data(updater.key_update())
        for _ in range(MAX_KEY_UPDATES):
            client.receive_data(server.protect(ContentType.application_data, data))
    assert client.key_updates_received == 3 * MAX_KEY_UPDATES
    assert client.state == State.CONNECTED


def test_empty_record_flood() -> None:
    client, server = connected_pair()
    for _ in range(MAX_EMPTY_RECORDS):
        client.receive_data(server.protect(ContentType.application_data, b""))
    empty = server.protect(ContentType.application_data, b"")
    error = expect_alert(client, empty, alerts.UnexpectedMessage, server)
    assert f"more than {MAX_EMPTY_RECORDS} empty records" in str(error)


def test_empty_record_flood_interleaved() -> None:
    # The attack pattern: 60 empty records, then one 1-byte record, again.
    client, server = connected_pair()
    burst = [server.protect(ContentType.application_data, b"") for _ in range(60)]
    client.receive_data(b"".join(burst))
    client.receive_data(server.protect(ContentType.application_data, b"x"))
    burst = [server.protect(ContentType.application_data, b"") for _ in range(60)]
    expect_alert(client, b"".join(burst), alerts.UnexpectedMessage, server)


def test_empty_records_paid_by_data() -> None:
    client, server = connected_pair()
    # 64 * 256 bytes is one full 16 KiB record, which pays for 64 empty ones.
    data = b"d" * (MAX_EMPTY_RECORDS * EMPTY_RECORD_CREDIT_BYTES)
    for _ in range(5):
        for _ in range(MAX_EMPTY_RECORDS):
            client.receive_data(server.protect(ContentType.application_data, b""))
        client.receive_data(server.protect(ContentType.application_data, data))
    assert client.state == State.CONNECTED


def test_user_canceled_flood() -> None:
    client, server = connected_pair()
    for _ in range(MAX_EMPTY_RECORDS):
        client.receive_data(server.protect(ContentType.alert, b"\x01\x5a"))
    canceled = server.protect(ContentType.alert, b"\x01\x5a")
    expect_alert(client, canceled, alerts.UnexpectedMessage, server)


def test_new_session_ticket_dropped() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    events(client)
    ticket = m.push_new_session_ticket(m.NewSessionTicket(7200, 1, b"n", b"ticket"))
    client.receive_data(server.protect(ContentType.handshake, ticket))
    assert events(client) == []
    assert client.handshake_complete


def test_post_handshake_certificate_request() -> None:
    client = new_client()
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    request = m.push_certificate_request(
        m.CertificateRequest(
            b"\x01", [(E.signature_algorithms, m.push_uint16_list_extension([0x0403]))]
        )
    )
    expect_alert(
        client,
        server.protect(ContentType.handshake, request),
        alerts.UnexpectedMessage,
        server,
    )


# Client authentication


def authenticate(
    identities: list[ClientIdentity],
    schemes: list[int] | None = None,
    authorities: list[bytes] | None = None,
) -> tuple[ClientConnection, ScriptedServer, list[Event]]:
    client, server = started(identities=identities)
    wire = server.server_hello() + server.encrypted_extensions()
    wire += server.certificate_request(schemes, authorities)
    wire += server.certificate() + server.certificate_verify() + server.finished()
    client.receive_data(wire)
    return client, server, events(client)


def test_signature_requested() -> None:
    client, _server, found = authenticate([identity(CLIENT)])
    assert len(found) == 1
    request = found[0]
    assert isinstance(request, SignatureRequested)
    assert request.scheme == SignatureScheme.ecdsa_secp256r1_sha256
    assert request.content.startswith(b" " * 64 + CLIENT_CONTEXT + b"\x00")
    assert client.state == State.WAIT_SIGNATURE


def test_client_certificate_flight() -> None:
    client, server, found = authenticate([identity(CLIENT)])
    request = found[0]
    assert isinstance(request, SignatureRequested)
    certificate_record = server.read_client_records(client.data_to_send())
    signature = sign_with_private_key(CLIENT.key, request.content, request.scheme)
    client.provide_signature(signature)
    records = server.read_client_finished(client.data_to_send())
    certificate = m.pull_certificate(certificate_record[0][1][4:])
    verify = m.pull_certificate_verify(records[0][1][4:])
    assert [e.cert_data for e in certificate.certificate_list] == [
        CLIENT.cert.public_bytes(Encoding.DER)
    ]
    assert verify.algorithm == SignatureScheme.ecdsa_secp256r1_sha256
    verify_signature(
        CLIENT.key.public_key(),
        verify.signature,
        request.content,
        SignatureScheme.ecdsa_secp256r1_sha256,
    )
    assert records[1][1][0] == m.HandshakeType.finished
    assert [type(e) for e in events(client)] == [HandshakeComplete]
    assert client.client_identity is not None
    assert client.client_identity.chain == tuple(CLIENT.chain)


def test_identity_chosen_by_ca_name() -> None:
    identities = [identity(OTHER_CLIENT), identity(CLIENT)]
    authorities = [CA.cert.subject.public_bytes()]
    _, _, found = authenticate(identities, authorities=authorities)
    request = found[0]
    assert isinstance(request, SignatureRequested)
    assert request.identity.chain[0] == CLIENT.cert


def test_identity_fallback_to_first_signer() -> None:
    identities = [identity(OTHER_CLIENT), identity(CLIENT)]
    authorities = [make_ca("unrelated").cert.subject.public_bytes()]
    _, _, found = authenticate(identities, authorities=authorities)
    request = found[0]
    assert isinstance(request, SignatureRequested)
    assert request.identity.chain[0] == OTHER_CLIENT.cert


def test_no_usable_identity_sends_empty_certificate() -> None:
    client, server, found = authenticate(
        [identity(CLIENT)], schemes=[SignatureScheme.rsa_pss_rsae_sha256]
    )
    records = server.read_client_finished(client.data_to_send())
    certificate = m.pull_certificate(records[0][1][4:])
    assert certificate.certificate_list == []
    assert records[1][1][0] == m.HandshakeType.finished
    assert [type(e) for e in found] == [HandshakeComplete]
    assert client.client_identity is None


def test_certificate_required_names_schemes() -> None:
    client, server, _ = authenticate(
        [identity(CLIENT)], schemes=[SignatureScheme.ed25519]
    )
    records = server.read_client_finished(client.data_to_send())
    certificate = m.pull_certificate(records[0][1][4:])
    assert certificate.certificate_list == []
    alert = bytes([alerts.AlertLevel.fatal, AlertDescription.certificate_required])
    with pytest.raises(alerts.AlertReceived) as caught:
        client.receive_data(server.protect(ContentType.alert, alert))
    message = str(caught.value)
    assert caught.value.description == AlertDescription.certificate_required
    assert message.startswith("server sent alert certificate_required")
    assert "the server accepts ed25519;" in message
    assert "our keys offer ecdsa_secp256r1_sha256" in message


@pytest.mark.interop
@pytest.mark.anyio
async def test_certificate_required_from_s_server(tmp_path: Path) -> None:
    files = make_files(tmp_path)
    cert, key = files.server("p256")
    # -client_sigalgs sets the CertificateRequest list only, so the server
    # still signs with its P-256 key.
    extra_args = ["-client_sigalgs", "ed25519"]
    with start_openssl_server(
        tmp_path, cert, key, files.ca_path, extra_args=extra_args
    ) as peer:
        stream = await open_tls(peer.port, files.config(files.client("p256")))
        async with stream:
            with (
                anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS),
                pytest.raises(alerts.AlertReceived) as caught,
            ):
                await stream.receive()
    message = str(caught.value)
    assert stream.client_identity is None
    assert caught.value.description == AlertDescription.certificate_required
    assert "the server accepts ed25519;" in message
    assert "our keys offer ecdsa_secp256r1_sha256" in message


def test_signature_before_request() -> None:
    client, _ = started()
    with pytest.raises(alerts.TLSError, match="no signature was requested"):
        client.provide_signature(b"sig")


def test_client_signed_content() -> None:
    transcript_hash = bytes(range(32))
    content = signed_content(CLIENT_CONTEXT, transcript_hash)
    assert (
        content
        == b"\x20" * 64 + b"TLS 1.3, client CertificateVerify\x00" + transcript_hash
    )
