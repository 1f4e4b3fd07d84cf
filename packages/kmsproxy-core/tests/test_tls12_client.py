"""Byte-level specification of the TLS 1.2 client against a scripted server."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from pki import Issued, issue, make_ca
from scripted_server12 import ClientFlight, ScriptedServer12, plaintext_record
from tls_harness import events

from kmsproxy.signer import (
    PrivateKey,
    SignatureScheme,
    SoftwareSigner,
    sign_with_private_key,
    verify_signature,
)
from kmsproxy.tls import alerts
from kmsproxy.tls import messages as m
from kmsproxy.tls.alerts import AlertDescription
from kmsproxy.tls.config import ClientIdentity, TLSClientConfig
from kmsproxy.tls.events import (
    ApplicationData,
    CloseNotifyReceived,
    HandshakeComplete,
    SignatureRequested,
)
from kmsproxy.tls.records import ContentType
from kmsproxy.tls.session_cache import SessionCache
from kmsproxy.tls.tls12 import messages12 as m12
from kmsproxy.tls.tls12.client12 import (
    MAX_CONSECUTIVE_EMPTY_RECORDS,
    MAX_DEFERRED_APPLICATION_DATA,
    MAX_RENEGOTIATIONS,
    ClientConnection12,
    State12,
)
from kmsproxy.tls.tls12.key_schedule12 import CIPHER_SUITES12, CipherSuite12
from kmsproxy.tls.tls12.offer import add_tls12_offer, offers_tls12_only
from kmsproxy.tls.tls12.session12 import (
    DEFAULT_TICKET_LIFETIME_SECONDS,
    MAX_TICKET12_LIFETIME_SECONDS,
    Session12,
    ticket_lifetime,
)
from kmsproxy.tls.verify import TrustStore

CA = make_ca()
SERVER = issue(CA, "server", dns_names=("server.test",))
RSA_SERVER = issue(CA, "rsa server", dns_names=("server.test",), key_type="rsa2048")
OTHER_SERVER = issue(CA, "other server", dns_names=("server.test",))
CLIENT = issue(CA, "client", client=True)
RSA_CLIENT = issue(CA, "rsa client", client=True, key_type="rsa2048")

E = m.ExtensionType
E12 = m12.ExtensionType12
H12 = m12.HandshakeType12
C = CipherSuite12

PKCS1_SCHEMES = (
    SignatureScheme.rsa_pkcs1_sha256,
    SignatureScheme.rsa_pkcs1_sha384,
    SignatureScheme.rsa_pkcs1_sha512,
)


class Pkcs1Signer(SoftwareSigner):
    """An RSA signer without PSS, like many PKCS#11 tokens."""

    @property
    def schemes(self) -> tuple[SignatureScheme, ...]:
        return PKCS1_SCHEMES


# The private key of each client leaf, for signing in the tests.
KEYS: dict[x509.Certificate, PrivateKey] = {}


def identity(issued: Issued, signer: SoftwareSigner | None = None) -> ClientIdentity:
    KEYS[issued.cert] = issued.key
    return ClientIdentity(
        tuple(issued.chain), signer or SoftwareSigner(issued.key, "file:test")
    )


def started(
    server_identity: Issued = SERVER, **settings: object
) -> tuple[ClientConnection12, ScriptedServer12]:
    config = TLSClientConfig("server.test", **settings)  # type: ignore[arg-type]
    client = ClientConnection12(config)
    suite = C.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    if isinstance(server_identity.key, rsa.RSAPrivateKey):
        suite = C.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    server = ScriptedServer12(server_identity, suite)
    client.start()
    server.read_client_hello(client.data_to_send())
    return client, server


def handshake(
    client: ClientConnection12,
    server: ScriptedServer12,
    *,
    request_certificate: bool = False,
) -> ClientFlight:
    """Run the rest of a full handshake, signing when asked."""
    client.receive_data(server.first_flight(request_certificate=request_certificate))
    output = client.data_to_send()
    for event in events(client):
        if isinstance(event, SignatureRequested):
            client.provide_signature(sign(event))
            output += client.data_to_send()
    flight = server.read_client_flight(output)
    client.receive_data(server.finished())
    return flight


def sign(event: SignatureRequested) -> bytes:
    """Sign as the Signer would, synchronously (the test keys are in memory)."""
    key = KEYS[event.identity.chain[0]]
    return sign_with_private_key(key, event.content, event.scheme)


def expect_alert(
    client: ClientConnection12,
    data: bytes,
    error: type[alerts.Alert],
    server: ScriptedServer12 | None = None,
) -> alerts.Alert:
    """Feed `data`, expect `error`, and check that the queued alert record
    carries the same description."""
    with pytest.raises(error) as caught:
        client.receive_data(data)
    assert client.state == State12.CLOSED
    output = client.data_to_send()
    if server is not None:
        assert server.client_alert(output) == caught.value.description
    else:
        assert output[:3] == bytes([ContentType.alert, 3, 3])
        assert output[-2:] == bytes([2, caught.value.description])
    return caught.value


# The ClientHello


def test_client_hello_shape() -> None:
    _client, server = started(alpn_protocols=["http/1.1"])
    hello = server.client_hello
    assert hello is not None
    assert hello.legacy_version == 0x0303
    assert hello.legacy_session_id == b""
    assert hello.cipher_suites == list(CIPHER_SUITES12)
    assert server.client_extension(E.supported_versions) is None
    assert server.client_extension(E.key_share) is None
    assert server.client_extension(E12.extended_master_secret) == b""
    assert server.client_extension(E12.renegotiation_info) == b"\x00"
    assert server.client_extension(E12.ec_point_formats) == b"\x01\x00"
    assert server.client_extension(E.server_name) == m.push_server_name("server.test")
    groups = m.pull_uint16_list_extension(
        server.client_extension(E.supported_groups) or b"", "groups", 2
    )
    assert groups == [0x001D, 0x0017, 0x0018, 0x0019]
    schemes = m.pull_uint16_list_extension(
        server.client_extension(E.signature_algorithms) or b"", "schemes", 2
    )
    assert SignatureScheme.rsa_pkcs1_sha256 in schemes
    assert SignatureScheme.rsa_pkcs1_sha1 not in schemes


def test_client_hello_no_sni_for_ip() -> None:
    client = ClientConnection12(TLSClientConfig("127.0.0.1"))
    server = ScriptedServer12(SERVER)
    client.start()
    server.read_client_hello(client.data_to_send())
    assert server.client_extension(E.server_name) is None


# A valid handshake


def test_handshake_completes() -> None:
    client, server = started()
    flight = handshake(client, server)
    assert [type(e) for e in events(client)] == [HandshakeComplete]
    assert client.handshake_complete
    assert client.version == "TLSv1.2"
    assert client.cipher_suite == "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
    assert client.peer_chain == SERVER.chain
    assert client.secure_renegotiation
    assert flight.certificate is None
    assert flight.certificate_verify is None


@pytest.mark.parametrize("suite", list(C))
def test_each_cipher_suite(suite: CipherSuite12) -> None:
    server_identity = RSA_SERVER if "_RSA_" in suite.name else SERVER
    server = ScriptedServer12(server_identity, suite)
    client = ClientConnection12(TLSClientConfig("server.test"))
    client.start()
    server.read_client_hello(client.data_to_send())
    handshake(client, server)
    assert client.handshake_complete
    assert client.cipher_suite == suite.name


@pytest.mark.parametrize(
    "group", [m.NamedGroup.x25519, m.NamedGroup.secp256r1, m.NamedGroup.secp384r1]
)
def test_each_group(group: m.NamedGroup) -> None:
    client, server = started()
    server.group = group
    handshake(client, server)
    assert client.handshake_complete
    assert client.key_exchange_group == group


def test_application_data_both_ways() -> None:
    client, server = started()
    handshake(client, server)
    events(client)
    client.send_application_data(b"ping")
    assert server.records(client.data_to_send()) == [
        (ContentType.application_data, b"ping")
    ]
    client.receive_data(server.send(ContentType.application_data, b"pong"))
    assert events(client) == [ApplicationData(b"pong")]


def test_large_write_splits_records() -> None:
    client, server = started()
    handshake(client, server)
    client.send_application_data(bytes(40000))
    records = server.records(client.data_to_send())
    assert [len(content) for _, content in records] == [16384, 16384, 7232]


def test_gcm_explicit_nonce_is_sequence() -> None:
    client, server = started()
    handshake(client, server)
    client.send_application_data(b"a")
    client.send_application_data(b"b")
    output = client.data_to_send()
    # Each record: 5-byte header, then the 8-byte explicit nonce. Our
    # Finished used sequence number 0.
    assert output[5:13] == (1).to_bytes(8, "big")
    assert output[5 + 8 + 1 + 16 + 5 :][:8] == (2).to_bytes(8, "big")


def test_fragmented_handshake_message() -> None:
    client, server = started()
    hello = server.server_hello()
    certificate = m12.push_certificate12(
        m12.Certificate12([c.public_bytes(Encoding.DER) for c in SERVER.chain])
    )
    server.transcript += certificate
    pieces = [certificate[:3], certificate[3:100], certificate[100:]]
    fragments = b"".join(server.send(ContentType.handshake, p) for p in pieces)
    client.receive_data(hello + fragments)
    client.receive_data(server.server_key_exchange() + server.server_hello_done())
    server.read_client_flight(client.data_to_send())
    client.receive_data(server.finished())
    assert client.handshake_complete


def test_close_notify() -> None:
    client, server = started()
    handshake(client, server)
    events(client)
    client.receive_data(server.send(ContentType.alert, b"\x01\x00"))
    assert events(client) == [CloseNotifyReceived()]
    assert client.receive_closed


def test_warning_alert_ignored() -> None:
    client, server = started()
    handshake(client, server)
    events(client)
    unrecognized_name = bytes([1, AlertDescription.unrecognized_name])
    client.receive_data(server.send(ContentType.alert, unrecognized_name))
    client.receive_data(server.send(ContentType.application_data, b"still here"))
    assert events(client) == [ApplicationData(b"still here")]


def test_fatal_alert_raises() -> None:
    client, _ = started()
    with pytest.raises(alerts.AlertReceived) as caught:
        client.receive_data(plaintext_record(ContentType.alert, b"\x02\x28"))
    assert caught.value.description == AlertDescription.handshake_failure
    assert client.state == State12.CLOSED


# Client authentication


def test_client_certificate_ecdsa() -> None:
    client, server = started(identities=[identity(CLIENT)])
    client.receive_data(server.first_flight(request_certificate=True))
    partial = client.data_to_send()
    [event] = events(client)
    assert isinstance(event, SignatureRequested)
    assert event.scheme == SignatureScheme.ecdsa_secp256r1_sha256
    client.provide_signature(sign(event))
    flight = server.read_client_flight(partial + client.data_to_send())
    client.receive_data(server.finished())
    assert flight.certificate is not None
    assert flight.certificate.certificate_list == [
        c.public_bytes(Encoding.DER) for c in CLIENT.chain
    ]
    assert flight.certificate_verify is not None
    # CertificateVerify signs every handshake message before it.
    assert event.content == flight.signed_messages
    verify_signature(
        CLIENT.key.public_key(),
        flight.certificate_verify.signature,
        flight.signed_messages,
        SignatureScheme.ecdsa_secp256r1_sha256,
    )
    assert client.handshake_complete
    assert client.client_identity is not None


def test_client_certificate_rsa_pkcs1() -> None:
    signer = Pkcs1Signer(RSA_CLIENT.key, "pkcs11:token=test")
    client, server = started(identities=[identity(RSA_CLIENT, signer)])
    client.receive_data(
        server.server_hello()
        + server.certificate()
        + server.server_key_exchange()
        + server.certificate_request(
            types=bytes([m12.ClientCertificateType.rsa_sign]),
            schemes=[SignatureScheme.rsa_pss_rsae_sha256, *PKCS1_SCHEMES],
        )
        + server.server_hello_done()
    )
    partial = client.data_to_send()
    [event] = events(client)
    assert isinstance(event, SignatureRequested)
    assert event.scheme == SignatureScheme.rsa_pkcs1_sha256
    client.provide_signature(sign(event))
    flight = server.read_client_flight(partial + client.data_to_send())
    assert flight.certificate_verify is not None
    assert flight.certificate_verify.algorithm == SignatureScheme.rsa_pkcs1_sha256


def test_certificate_type_mismatch_sends_none() -> None:
    client, server = started(identities=[identity(CLIENT)])
    client.receive_data(
        server.server_hello()
        + server.certificate()
        + server.server_key_exchange()
        + server.certificate_request(types=bytes([m12.ClientCertificateType.rsa_sign]))
        + server.server_hello_done()
    )
    flight = server.read_client_flight(client.data_to_send())
    assert events(client) == []
    assert flight.certificate == m12.Certificate12([])
    assert flight.certificate_verify is None


def test_mismatch_named_in_server_alert() -> None:
    client, server = started(identities=[identity(CLIENT)])
    client.receive_data(
        server.server_hello()
        + server.certificate()
        + server.server_key_exchange()
        + server.certificate_request(schemes=[SignatureScheme.ecdsa_secp384r1_sha384])
        + server.server_hello_done()
    )
    server.read_client_flight(client.data_to_send())
    alert = server.send(ContentType.alert, bytes([2, 40]))
    with pytest.raises(alerts.AlertReceived) as caught:
        client.receive_data(alert)
    message = str(caught.value)
    assert message.startswith("server sent alert handshake_failure (40)")
    assert "the server accepts ecdsa_secp384r1_sha384" in message
    assert "our keys offer ecdsa_secp256r1_sha256" in message


def test_listed_ca_preferred() -> None:
    other_ca = make_ca("other CA")
    other_client = issue(other_ca, "other client", client=True)
    client, server = started(identities=[identity(CLIENT), identity(other_client)])
    client.receive_data(
        server.server_hello()
        + server.certificate()
        + server.server_key_exchange()
        + server.certificate_request(authorities=[other_ca.cert.subject.public_bytes()])
        + server.server_hello_done()
    )
    [event] = events(client)
    assert isinstance(event, SignatureRequested)
    assert event.identity.chain == tuple(other_client.chain)


# ServerHello violations


def test_missing_extended_master_secret() -> None:
    client, server = started()
    extensions = [
        e
        for e in server.server_hello_extensions()
        if e[0] != E12.extended_master_secret
    ]
    error = expect_alert(
        client, server.server_hello(extensions), alerts.HandshakeFailure
    )
    assert "extended master secret" in str(error)


def test_renegotiation_info_not_empty() -> None:
    client, server = started()
    extensions: list[m.Extension] = [
        (E12.renegotiation_info, m12.push_renegotiation_info(bytes(12))),
        (E12.extended_master_secret, b""),
    ]
    expect_alert(client, server.server_hello(extensions), alerts.HandshakeFailure)


def test_suite_not_offered() -> None:
    client, server = started()
    wire = server.server_hello(cipher_suite=0xC027)
    expect_alert(client, wire, alerts.IllegalParameter)


def test_tls13_suite_rejected() -> None:
    client, server = started()
    wire = server.server_hello(cipher_suite=0x1301)
    expect_alert(client, wire, alerts.IllegalParameter)


def test_old_version_rejected() -> None:
    client, server = started()
    wire = server.server_hello(legacy_version=0x0302)
    expect_alert(client, wire, alerts.ProtocolVersion)


def test_compression_rejected() -> None:
    client, server = started()
    wire = server.server_hello(legacy_compression_method=1)
    expect_alert(client, wire, alerts.IllegalParameter)


def test_unsolicited_extension() -> None:
    client, server = started()
    extensions = [*server.server_hello_extensions(), (E12.session_ticket, b"")]
    expect_alert(client, server.server_hello(extensions), alerts.UnsupportedExtension)


def test_unsolicited_alpn() -> None:
    client, server = started()
    alpn = (E.application_layer_protocol_negotiation, m.push_alpn([b"h2"]))
    extensions = [*server.server_hello_extensions(), alpn]
    expect_alert(client, server.server_hello(extensions), alerts.UnsupportedExtension)


def test_alpn_selected() -> None:
    client, server = started(alpn_protocols=["h2", "http/1.1"])
    alpn = (E.application_layer_protocol_negotiation, m.push_alpn([b"http/1.1"]))
    server.server_hello_extensions = (  # type: ignore[method-assign]
        lambda: [*ScriptedServer12.server_hello_extensions(server), alpn]
    )
    handshake(client, server)
    assert client.alpn_protocol == "http/1.1"


def test_supported_versions_rejected() -> None:
    client, server = started()
    extensions = [
        *server.server_hello_extensions(),
        (E.supported_versions, b"\x03\x03"),
    ]
    expect_alert(client, server.server_hello(extensions), alerts.IllegalParameter)


def test_session_id_echo_without_ticket() -> None:
    client = ClientConnection12(TLSClientConfig("server.test"))
    client.start()
    server = ScriptedServer12(SERVER)
    server.read_client_hello(client.data_to_send())
    wire = server.server_hello(legacy_session_id_echo=bytes(32))
    # A session ID we did not send is a new session, not an echo.
    client.receive_data(wire)
    assert client.state == State12.WAIT_CERTIFICATE


def test_point_formats_without_uncompressed() -> None:
    client, server = started()
    extensions = [
        e for e in server.server_hello_extensions() if e[0] != E12.ec_point_formats
    ]
    extensions.append((E12.ec_point_formats, b"\x01\x01"))
    expect_alert(client, server.server_hello(extensions), alerts.IllegalParameter)


# Certificate and ServerKeyExchange violations


def test_certificate_key_does_not_fit_suite() -> None:
    client, server = started()
    wire = server.server_hello() + server.certificate(RSA_SERVER)
    expect_alert(client, wire, alerts.UnsupportedCertificate)


def test_empty_server_certificate() -> None:
    client, server = started()
    wire = server.server_hello() + server.handshake(
        m12.push_certificate12(m12.Certificate12([]))
    )
    expect_alert(client, wire, alerts.DecodeError)


def test_certificate_for_other_name() -> None:
    trust = TrustStore([CA.cert])
    client = ClientConnection12(TLSClientConfig("other.test", trust=trust))
    client.start()
    server = ScriptedServer12(SERVER)
    server.read_client_hello(client.data_to_send())
    wire = server.server_hello() + server.certificate()
    error = expect_alert(client, wire, alerts.CertificateVerifyFailed)
    assert "other.test" in str(error)


def test_trusted_certificate_accepted() -> None:
    trust = TrustStore([CA.cert])
    client = ClientConnection12(TLSClientConfig("server.test", trust=trust))
    client.start()
    server = ScriptedServer12(SERVER)
    server.read_client_hello(client.data_to_send())
    handshake(client, server)
    assert client.handshake_complete


def test_bad_key_exchange_signature() -> None:
    client, server = started()
    wire = server.server_hello() + server.certificate()
    wire += server.handshake(server.server_key_exchange_message(corrupt_signature=True))
    expect_alert(client, wire, alerts.DecryptError)


def test_key_exchange_scheme_not_offered() -> None:
    client, server = started(RSA_SERVER)
    wire = server.server_hello() + server.certificate()
    wire += server.handshake(
        server.server_key_exchange_message(SignatureScheme.rsa_pkcs1_sha1)
    )
    expect_alert(client, wire, alerts.IllegalParameter)


def test_key_exchange_scheme_wrong_key() -> None:
    client, server = started()
    wire = server.server_hello() + server.certificate()
    message = server.server_key_exchange_message()
    exchange = m12.pull_server_key_exchange(message[4:])
    exchange.algorithm = SignatureScheme.rsa_pkcs1_sha256
    wire += server.handshake(m12.push_server_key_exchange(exchange))
    expect_alert(client, wire, alerts.IllegalParameter)


def test_key_exchange_group_not_offered() -> None:
    client, server = started()
    wire = server.server_hello() + server.certificate()
    message = server.server_key_exchange_message()
    exchange = m12.pull_server_key_exchange(message[4:])
    exchange.named_curve = 0x001E  # x448
    wire += server.handshake(m12.push_server_key_exchange(exchange))
    expect_alert(client, wire, alerts.IllegalParameter)


def test_key_exchange_explicit_curve() -> None:
    client, server = started()
    wire = server.server_hello() + server.certificate()
    message = bytearray(server.server_key_exchange_message())
    message[4] = 1  # explicit_prime
    wire += server.handshake(bytes(message))
    expect_alert(client, wire, alerts.IllegalParameter)


def test_key_exchange_truncated() -> None:
    client, server = started()
    wire = server.server_hello() + server.certificate()
    message = server.server_key_exchange_message()
    body = message[4:-10]
    wire += server.handshake(m12.encode_handshake12(H12.server_key_exchange, body))
    expect_alert(client, wire, alerts.DecodeError)


def test_invalid_key_share_point() -> None:
    client, server = started(RSA_SERVER)
    server.group = m.NamedGroup.secp256r1
    wire = server.server_hello() + server.certificate()
    message = server.server_key_exchange_message()
    exchange = m12.pull_server_key_exchange(message[4:])
    # Re-sign a point that is not on the curve.
    exchange.public = b"\x04" + bytes(64)
    assert server.client_hello is not None
    signed = server.client_hello.random + server.server_random + exchange.params
    exchange.signature = sign_with_private_key(
        RSA_SERVER.key, signed, SignatureScheme.rsa_pkcs1_sha256
    )
    wire += server.handshake(m12.push_server_key_exchange(exchange))
    expect_alert(client, wire, alerts.IllegalParameter)


# Order and record violations


def test_key_exchange_before_certificate() -> None:
    client, server = started()
    wire = server.server_hello() + server.server_key_exchange()
    expect_alert(client, wire, alerts.UnexpectedMessage)


def test_finished_without_change_cipher_spec() -> None:
    client, server = started()
    client.receive_data(server.first_flight())
    server.read_client_flight(client.data_to_send())
    wire = server.handshake(m12.push_finished12(bytes(12)))
    expect_alert(client, wire, alerts.UnexpectedMessage, server)


def test_early_change_cipher_spec() -> None:
    client, server = started()
    wire = server.server_hello() + plaintext_record(
        ContentType.change_cipher_spec, b"\x01"
    )
    expect_alert(client, wire, alerts.UnexpectedMessage)


def test_bad_server_finished() -> None:
    client, server = started()
    client.receive_data(server.first_flight())
    server.read_client_flight(client.data_to_send())
    expect_alert(client, server.finished(corrupt=True), alerts.DecryptError, server)


def test_application_data_before_finished() -> None:
    client, server = started()
    wire = server.server_hello() + plaintext_record(
        ContentType.application_data, b"early"
    )
    expect_alert(client, wire, alerts.UnexpectedMessage)


def test_wrong_record_version() -> None:
    client, server = started()
    record = bytearray(server.server_hello())
    record[1:3] = b"\x03\x01"
    expect_alert(client, bytes(record), alerts.DecodeError)


def test_plaintext_record_overflow() -> None:
    client, _ = started()
    header = bytes([ContentType.handshake, 3, 3]) + (2**14 + 1).to_bytes(2, "big")
    expect_alert(client, header, alerts.RecordOverflow)


def test_protected_record_overflow() -> None:
    client, server = started()
    handshake(client, server)
    header = bytes([ContentType.application_data, 3, 3])
    header += (2**14 + 2048 + 1).to_bytes(2, "big")
    expect_alert(client, header, alerts.RecordOverflow, server)


def test_tampered_record() -> None:
    client, server = started()
    handshake(client, server)
    record = bytearray(server.send(ContentType.application_data, b"data"))
    record[-1] ^= 1
    expect_alert(client, bytes(record), alerts.BadRecordMac, server)


def test_empty_handshake_record() -> None:
    client, _ = started()
    expect_alert(
        client, plaintext_record(ContentType.handshake, b""), alerts.DecodeError
    )


def test_handshake_message_too_long() -> None:
    client, _ = started()
    header = bytes([H12.certificate]) + (200 * 1024).to_bytes(3, "big")
    wire = plaintext_record(ContentType.handshake, header)
    expect_alert(client, wire, alerts.DecodeError)


def test_hello_request_during_handshake_ignored() -> None:
    client, server = started()
    client.receive_data(server.send(ContentType.handshake, m12.push_hello_request()))
    handshake(client, server)
    assert client.handshake_complete
    assert client.renegotiations == 0


# Renegotiation (RFC 5746)


def test_renegotiation_with_certificate() -> None:
    client, server = started(identities=[identity(CLIENT)])
    handshake(client, server)
    events(client)
    first_client_verify = server.client_verify_data

    # The server asks; the client sends a protected ClientHello that binds
    # this renegotiation to the previous handshake.
    client.receive_data(server.hello_request())
    hello = server.read_client_hello(client.data_to_send())
    info = m.find_extension(hello.extensions, E12.renegotiation_info)
    assert info == m12.push_renegotiation_info(first_client_verify)

    client.receive_data(server.first_flight(request_certificate=True))
    partial = client.data_to_send()
    [event] = events(client)
    assert isinstance(event, SignatureRequested)
    # Data sent while the signature is pending waits for our Finished.
    client.send_application_data(b"queued")
    client.provide_signature(sign(event))
    flight = server.read_client_flight(partial + client.data_to_send())
    client.receive_data(server.finished())

    assert flight.certificate_verify is not None
    assert flight.application_data == [b"queued"]
    assert client.renegotiations == 1
    assert client.post_handshake_authentications == 1
    assert client.client_identity is not None
    assert client.state == State12.CONNECTED
    assert [type(e) for e in events(client)] == [HandshakeComplete]


def test_application_data_during_renegotiation() -> None:
    client, server = started()
    handshake(client, server)
    events(client)
    client.receive_data(server.hello_request())
    server.read_client_hello(client.data_to_send())
    client.receive_data(server.send(ContentType.application_data, b"in between"))
    assert events(client) == [ApplicationData(b"in between")]


def test_renegotiation_info_mismatch() -> None:
    client, server = started()
    handshake(client, server)
    client.receive_data(server.hello_request())
    server.read_client_hello(client.data_to_send())
    server.client_verify_data = bytes(12)
    expect_alert(client, server.server_hello(), alerts.HandshakeFailure, server)


def test_renegotiation_certificate_changed() -> None:
    client, server = started()
    handshake(client, server)
    client.receive_data(server.hello_request())
    server.read_client_hello(client.data_to_send())
    wire = server.server_hello() + server.certificate(OTHER_SERVER)
    expect_alert(client, wire, alerts.BadCertificate, server)


def test_insecure_server_gets_no_renegotiation() -> None:
    client, server = started()
    server.server_hello_extensions = lambda: [  # type: ignore[method-assign]
        (E12.extended_master_secret, b"")
    ]
    handshake(client, server)
    assert not client.secure_renegotiation
    client.receive_data(server.hello_request())
    [(content_type, content)] = server.records(client.data_to_send())
    assert content_type == ContentType.alert
    assert content == bytes([1, AlertDescription.no_renegotiation])
    assert client.state == State12.CONNECTED


def renegotiate(client: ClientConnection12, server: ScriptedServer12) -> None:
    client.receive_data(server.hello_request())
    server.read_client_hello(client.data_to_send())
    client.receive_data(server.first_flight())
    server.read_client_flight(client.data_to_send())
    client.receive_data(server.finished())


def test_renegotiation_limit() -> None:
    client, server = started()
    handshake(client, server)
    for _ in range(MAX_RENEGOTIATIONS):
        renegotiate(client, server)
    assert client.renegotiations == MAX_RENEGOTIATIONS
    client.receive_data(server.hello_request())
    [(content_type, content)] = server.records(client.data_to_send())
    assert content_type == ContentType.alert
    assert content == bytes([1, AlertDescription.no_renegotiation])
    assert client.state == State12.CONNECTED


def test_deferred_data_bounded() -> None:
    client, server = started()
    handshake(client, server)
    client.receive_data(server.hello_request())
    client.send_application_data(bytes(MAX_DEFERRED_APPLICATION_DATA))
    with pytest.raises(alerts.TLSError, match="renegotiates"):
        client.send_application_data(b"x")


def test_hello_request_flood() -> None:
    client, server = started()
    flood = server.hello_request() * (MAX_CONSECUTIVE_EMPTY_RECORDS + 1)
    expect_alert(client, flood, alerts.UnexpectedMessage)


# Handover from a ClientHello that offered TLS 1.3 too


def handed_over(
    random: bytes | None = None,
) -> tuple[ClientConnection12, ScriptedServer12]:
    """Hand a ServerHello for a TLS 1.3-and-1.2 ClientHello to the machine."""
    server = ScriptedServer12(SERVER)
    hello = add_tls12_offer(
        m.ClientHello(
            random=bytes(range(32)),
            legacy_session_id=bytes(32),
            cipher_suites=[0x1301],
            extensions=[
                (E.supported_versions, m.push_supported_versions_client([0x0304])),
                (E.supported_groups, m.push_uint16_list_extension([0x11EC, 0x1D])),
                (E.signature_algorithms, m.push_uint16_list_extension([0x0403])),
            ],
        ),
        None,
        request_ticket=False,
    )
    message = m.push_client_hello(hello)
    server.client_hello = hello
    server.transcript = bytearray(message)
    if random is None:
        server_hello = server.server_hello_message()
    else:
        server_hello = server.server_hello_message(random=random)
    server.transcript += server_hello
    rest = server.certificate() + server.server_key_exchange()
    client = ClientConnection12(TLSClientConfig("server.test"))
    # The ServerHello arrived in its own record; the rest is unframed.
    client.hand_over(hello, message, server_hello, b"", rest)
    return client, server


def test_hand_over_completes() -> None:
    client, server = handed_over()
    assert client.state == State12.WAIT_CERTIFICATE_REQUEST_OR_DONE
    client.receive_data(server.server_hello_done())
    server.read_client_flight(client.data_to_send())
    client.receive_data(server.finished())
    assert client.handshake_complete


def test_hand_over_downgrade_sentinel() -> None:
    with pytest.raises(alerts.IllegalParameter, match="downgrade"):
        handed_over(bytes(24) + m.DOWNGRADE_SENTINELS[0])


# Resumption with RFC 5077 tickets


class Clock:
    """A session cache clock that tests move by hand, in seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cached_client(cache: SessionCache, **settings: object) -> ClientConnection12:
    config = TLSClientConfig(
        "server.test",
        session_cache=cache,
        session_key="server.test:443",
        **settings,  # type: ignore[arg-type]
    )
    return ClientConnection12(config)


def ticket_extensions(server: ScriptedServer12) -> list[m.Extension]:
    return [
        *ScriptedServer12.server_hello_extensions(server),
        (E12.session_ticket, b""),
    ]


def full_handshake_with_ticket(
    cache: SessionCache, ticket: bytes = b"ticket-1", **settings: object
) -> tuple[ClientConnection12, ScriptedServer12]:
    client = cached_client(cache, **settings)
    client.start()
    server = ScriptedServer12(SERVER)
    server.read_client_hello(client.data_to_send())
    client.receive_data(
        server.server_hello(ticket_extensions(server))
        + server.certificate()
        + server.server_key_exchange()
        + server.server_hello_done()
    )
    server.read_client_flight(client.data_to_send())
    client.receive_data(server.new_session_ticket(ticket) + server.finished())
    return client, server


def resume(
    cache: SessionCache, master_secret: bytes, new_ticket: bytes | None
) -> tuple[ClientConnection12, ScriptedServer12, ClientFlight]:
    """Run an abbreviated handshake that accepts the offered ticket."""
    client = cached_client(cache)
    client.start()
    server = ScriptedServer12(SERVER)
    hello = server.read_client_hello(client.data_to_send())
    extensions = server.server_hello_extensions()
    if new_ticket is not None:
        extensions = ticket_extensions(server)
    wire = server.server_hello(
        extensions, legacy_session_id_echo=hello.legacy_session_id
    )
    server.set_master_secret(master_secret)
    if new_ticket is not None:
        wire += server.new_session_ticket(new_ticket)
    client.receive_data(wire + server.finished())
    return client, server, server.read_client_flight(client.data_to_send())


def test_ticket_requested_and_stored() -> None:
    cache = SessionCache(clock=Clock())
    client, server = full_handshake_with_ticket(cache)
    assert server.client_extension(E12.session_ticket) == b""
    assert client.handshake_complete
    session = cache.take_tls12("server.test:443")
    assert session is not None
    assert session.ticket == b"ticket-1"
    assert session.master_secret == server.master_secret
    assert session.lifetime == 3600
    assert session.peer_chain == tuple(SERVER.chain)


def test_resumption_skips_signature() -> None:
    cache = SessionCache(clock=Clock())
    first, server = full_handshake_with_ticket(cache, identities=[identity(CLIENT)])
    client, resumed_server, flight = resume(cache, server.master_secret, b"ticket-2")
    hello = resumed_server.client_hello
    assert hello is not None
    assert resumed_server.client_extension(E12.session_ticket) == b"ticket-1"
    assert len(hello.legacy_session_id) == 32
    assert client.resumed
    assert client.handshake_complete
    assert client.peer_chain == SERVER.chain
    assert [type(e) for e in events(client)] == [HandshakeComplete]
    assert flight.certificate is None
    assert flight.client_key_exchange == b""
    assert flight.finished == resumed_server.client_verify_data
    session = cache.take_tls12("server.test:443")
    assert session is not None
    assert session.ticket == b"ticket-2"
    assert first.resumed is False


def test_resumption_keeps_ticket_without_new_one() -> None:
    cache = SessionCache(clock=Clock())
    _, server = full_handshake_with_ticket(cache)
    client, _, _ = resume(cache, server.master_secret, None)
    assert client.resumed
    session = cache.take_tls12("server.test:443")
    assert session is not None
    assert session.ticket == b"ticket-1"


def test_resumption_with_other_suite() -> None:
    cache = SessionCache(clock=Clock())
    full_handshake_with_ticket(cache)
    client = cached_client(cache)
    client.start()
    server = ScriptedServer12(SERVER, C.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)
    hello = server.read_client_hello(client.data_to_send())
    wire = server.server_hello(legacy_session_id_echo=hello.legacy_session_id)
    expect_alert(client, wire, alerts.IllegalParameter)


def test_expired_session_not_offered() -> None:
    clock = Clock()
    cache = SessionCache(clock=clock)
    full_handshake_with_ticket(cache)
    clock.now += 3600
    client = cached_client(cache)
    client.start()
    server = ScriptedServer12(SERVER)
    hello = server.read_client_hello(client.data_to_send())
    assert server.client_extension(E12.session_ticket) == b""
    assert hello.legacy_session_id == b""


def test_empty_ticket_not_stored() -> None:
    cache = SessionCache(clock=Clock())
    client, _ = full_handshake_with_ticket(cache, ticket=b"")
    assert client.handshake_complete
    assert cache.take_tls12("server.test:443") is None


def test_ticket_lifetime_hint_zero() -> None:
    assert ticket_lifetime(0) == DEFAULT_TICKET_LIFETIME_SECONDS
    assert ticket_lifetime(10**9) == MAX_TICKET12_LIFETIME_SECONDS


def test_cache_clear_drops_sessions() -> None:
    cache = SessionCache(clock=Clock())
    full_handshake_with_ticket(cache)
    assert len(cache) == 1
    cache.clear()
    assert cache.take_tls12("server.test:443") is None


def test_offer_adds_tls12() -> None:
    hello = m.ClientHello(
        random=bytes(32),
        legacy_session_id=bytes(32),
        cipher_suites=[0x1301, 0x1302],
        extensions=[
            (E.supported_versions, m.push_supported_versions_client([0x0304])),
            (E.pre_shared_key, b"psk"),
        ],
    )
    session = Session12(b"t", bytes(48), C.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, 60, 0)
    offered = add_tls12_offer(hello, session, request_ticket=True)
    types = [extension_type for extension_type, _ in offered.extensions]
    assert offered.cipher_suites == [0x1301, 0x1302, *CIPHER_SUITES12]
    assert m.find_extension(offered.extensions, E.supported_versions) == (
        b"\x04\x03\x04\x03\x03"
    )
    assert types[-1] == E.pre_shared_key
    assert m.find_extension(offered.extensions, E12.session_ticket) == b"t"
    assert m.find_extension(offered.extensions, E12.extended_master_secret) == b""
    assert m.find_extension(offered.extensions, E12.renegotiation_info) == b"\x00"


def test_pkcs1_only_key_offers_tls12_only(caplog: pytest.LogCaptureFixture) -> None:
    signer = Pkcs1Signer(RSA_CLIENT.key, "pkcs11:object=pkcs1-only-test")
    config = TLSClientConfig("server.test", [identity(RSA_CLIENT, signer)])
    with caplog.at_level("INFO", logger="kmsproxy.tls.tls12.offer"):
        assert offers_tls12_only(config)
        assert offers_tls12_only(config)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1
    assert "key=pkcs11:object=pkcs1-only-test" in logged[0]


def test_pss_key_offers_both_versions() -> None:
    config = TLSClientConfig("server.test", [identity(RSA_CLIENT)])
    assert not offers_tls12_only(config)


def test_no_identity_offers_both_versions() -> None:
    assert not offers_tls12_only(TLSClientConfig("server.test"))
