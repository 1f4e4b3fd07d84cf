"""A scripted TLS 1.2 server side for byte-level tests of `ClientConnection12`.

`ScriptedServer12` builds the server's messages one at a time, so a test
can send a valid flight, change one field, reorder messages or stop
anywhere, and it reads and checks the client's flight. It reuses the
engine's codecs and key derivation (whose PRF a test checks against
OpenSSL's); it is not an implementation of TLS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding
from pki import Issued

from kmsproxy.signer import SignatureScheme, sign_with_private_key
from kmsproxy.tls import messages as m
from kmsproxy.tls.key_exchange import generate_private_key, public_key_bytes
from kmsproxy.tls.records import ContentType
from kmsproxy.tls.tls12 import messages12 as m12
from kmsproxy.tls.tls12.key_schedule12 import (
    SUITES12,
    CipherSuite12,
    Suite12,
    extended_master_secret,
    finished_verify_data,
    key_block,
)
from kmsproxy.tls.tls12.records12 import RecordCipher12, RecordLayer12

E12 = m12.ExtensionType12

# The records of one flight the scripted server reads at most; a flight has
# fewer than ten, so the bound only stops a runaway loop.
MAX_RECORDS = 1000


def plaintext_record(content_type: int, data: bytes) -> bytes:
    return bytes([content_type, 3, 3]) + len(data).to_bytes(2, "big") + data


def default_scheme(key: object) -> SignatureScheme:
    if isinstance(key, rsa.RSAPrivateKey):
        return SignatureScheme.rsa_pkcs1_sha256
    return SignatureScheme.ecdsa_secp256r1_sha256


@dataclass
class ClientFlight:
    """What the client sent after ServerHelloDone, decoded."""

    certificate: m12.Certificate12 | None = None
    client_key_exchange: bytes = b""
    certificate_verify: m.CertificateVerify | None = None
    signed_messages: bytes = b""
    finished: bytes = b""
    application_data: list[bytes] = field(default_factory=list)


@dataclass
class ScriptedServer12:
    """The server half of TLS 1.2 handshakes, one message at a time."""

    identity: Issued
    suite_code: CipherSuite12 = CipherSuite12.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    group: m.NamedGroup = m.NamedGroup.x25519
    client_hello: m.ClientHello | None = None
    transcript: bytearray = field(default_factory=bytearray)
    layer: RecordLayer12 = field(default_factory=RecordLayer12)
    server_random: bytes = b""
    private_key: object = None
    master_secret: bytes = b""
    client_verify_data: bytes = b""
    server_verify_data: bytes = b""
    pending: tuple[RecordCipher12, RecordCipher12] | None = None

    @property
    def suite(self) -> Suite12:
        return SUITES12[self.suite_code]

    def hash(self, data: bytes) -> bytes:
        digest = hashes.Hash(self.suite.hash_factory())
        digest.update(data)
        return digest.finalize()

    def records(self, wire: bytes) -> list[tuple[int, bytes]]:
        """Frame (and, once keys are set, decrypt) the client's records."""
        self.layer.feed(wire)
        found = []
        for _ in range(MAX_RECORDS):
            record = self.layer.next_record()
            if record is None:
                break
            found.append(record)
            if record[0] == ContentType.change_cipher_spec and self.pending:
                self.layer.read_cipher = self.pending[0]
        return found

    def client_alert(self, wire: bytes) -> int:
        content_type, content = self.records(wire)[-1]
        assert content_type == ContentType.alert
        return content[1]

    # The client's messages

    def read_client_hello(self, wire: bytes) -> m.ClientHello:
        records = self.records(wire)
        assert [t for t, _ in records] == [ContentType.handshake]
        message = records[0][1]
        self.client_hello = m.pull_client_hello(message[4:])
        self.transcript = bytearray(message)
        return self.client_hello

    def client_extension(self, extension_type: int) -> bytes | None:
        assert self.client_hello is not None
        return m.find_extension(self.client_hello.extensions, extension_type)

    def read_client_flight(self, wire: bytes) -> ClientFlight:
        """Decode Certificate, ClientKeyExchange, CertificateVerify, CCS and
        Finished, deriving the keys as the client must have."""
        flight = ClientFlight()
        handshake = bytearray()
        self.layer.feed(wire)
        for _ in range(MAX_RECORDS):
            # Records one at a time: the keys for the records after
            # change_cipher_spec come from the ClientKeyExchange before it.
            record = self.layer.next_record()
            if record is None:
                break
            content_type, content = record
            if content_type == ContentType.change_cipher_spec:
                assert self.pending is not None
                self.layer.read_cipher = self.pending[0]
            elif content_type == ContentType.application_data:
                flight.application_data.append(content)
            elif content_type == ContentType.handshake:
                handshake += content
                self.read_client_messages(handshake, flight)
        return flight

    def read_client_messages(self, handshake: bytearray, flight: ClientFlight) -> None:
        while len(handshake) >= 4:
            length = int.from_bytes(handshake[1:4], "big")
            if len(handshake) < 4 + length:
                return
            message = bytes(handshake[: 4 + length])
            del handshake[: 4 + length]
            body = message[4:]
            if message[0] == m12.HandshakeType12.certificate:
                flight.certificate = m12.pull_certificate12(body)
            elif message[0] == m12.HandshakeType12.client_key_exchange:
                flight.client_key_exchange = m12.pull_client_key_exchange(body)
                self.transcript += message
                self.derive_keys(flight.client_key_exchange)
                continue
            elif message[0] == m12.HandshakeType12.certificate_verify:
                flight.signed_messages = bytes(self.transcript)
                flight.certificate_verify = m.pull_certificate_verify(body)
            elif message[0] == m12.HandshakeType12.finished:
                flight.finished = body
                expected = finished_verify_data(
                    self.suite,
                    self.master_secret,
                    b"client finished",
                    self.hash(bytes(self.transcript)),
                )
                assert body == expected, "client Finished is wrong"
                self.client_verify_data = body
            self.transcript += message

    def derive_keys(self, client_public: bytes) -> None:
        private_key = self.private_key
        if isinstance(private_key, x25519.X25519PrivateKey):
            peer = x25519.X25519PublicKey.from_public_bytes(client_public)
            premaster = private_key.exchange(peer)
        else:
            assert isinstance(private_key, ec.EllipticCurvePrivateKey)
            point = ec.EllipticCurvePublicKey.from_encoded_point(
                private_key.curve, client_public
            )
            premaster = private_key.exchange(ec.ECDH(), point)
        self.set_master_secret(
            extended_master_secret(
                self.suite, premaster, self.hash(bytes(self.transcript))
            )
        )

    def set_master_secret(self, master_secret: bytes) -> None:
        """Use `master_secret` (new, or a resumed session's) and derive the
        keys each side switches to after its change_cipher_spec."""
        self.master_secret = master_secret
        assert self.client_hello is not None
        keys = key_block(
            self.suite, self.master_secret, self.client_hello.random, self.server_random
        )
        self.pending = (
            RecordCipher12(self.suite, keys.client_key, keys.client_iv),
            RecordCipher12(self.suite, keys.server_key, keys.server_iv),
        )

    # The server's messages

    def send(self, content_type: int, content: bytes) -> bytes:
        return self.layer.encode(content_type, content)

    def handshake(self, message: bytes) -> bytes:
        self.transcript += message
        return self.send(ContentType.handshake, message)

    def server_hello_extensions(self) -> list[m.Extension]:
        return [
            (
                E12.renegotiation_info,
                m12.push_renegotiation_info(
                    self.client_verify_data + self.server_verify_data
                ),
            ),
            (E12.extended_master_secret, b""),
            (E12.ec_point_formats, m12.push_ec_point_formats()),
        ]

    def server_hello_message(
        self, extensions: list[m.Extension] | None = None, **changes: object
    ) -> bytes:
        assert self.client_hello is not None
        self.server_random = os.urandom(32)
        hello = m.ServerHello(
            self.server_random,
            b"",
            self.suite_code,
            self.server_hello_extensions() if extensions is None else extensions,
        )
        for name, value in changes.items():
            setattr(hello, name, value)
        self.server_random = hello.random
        return m.push_server_hello(hello)

    def server_hello(
        self, extensions: list[m.Extension] | None = None, **changes: object
    ) -> bytes:
        return self.handshake(self.server_hello_message(extensions, **changes))

    def certificate(self, issued: Issued | None = None) -> bytes:
        chain = (issued or self.identity).chain
        message = m12.Certificate12([c.public_bytes(Encoding.DER) for c in chain])
        return self.handshake(m12.push_certificate12(message))

    def server_key_exchange_message(
        self,
        scheme: SignatureScheme | None = None,
        *,
        group: m.NamedGroup | None = None,
        corrupt_signature: bool = False,
    ) -> bytes:
        assert self.client_hello is not None
        group = group or self.group
        private_key = generate_private_key(group)
        self.private_key = private_key
        exchange = m12.ServerKeyExchange(group, public_key_bytes(private_key), 0, b"")
        key = self.identity.key
        scheme = scheme or default_scheme(key)
        signed = self.client_hello.random + self.server_random + exchange.params
        signature = sign_with_private_key(key, signed, scheme)
        if corrupt_signature:
            signature = bytes([signature[0] ^ 1]) + signature[1:]
        exchange.algorithm = scheme
        exchange.signature = signature
        return m12.push_server_key_exchange(exchange)

    def server_key_exchange(self, scheme: SignatureScheme | None = None) -> bytes:
        return self.handshake(self.server_key_exchange_message(scheme))

    def certificate_request(
        self,
        types: bytes = bytes([m12.ClientCertificateType.ecdsa_sign]),
        schemes: list[int] | None = None,
        authorities: list[bytes] | None = None,
    ) -> bytes:
        request = m12.CertificateRequest12(
            types,
            schemes or [SignatureScheme.ecdsa_secp256r1_sha256],
            authorities or [],
        )
        return self.handshake(m12.push_certificate_request12(request))

    def server_hello_done(self) -> bytes:
        return self.handshake(m12.push_server_hello_done())

    def first_flight(self, *, request_certificate: bool = False) -> bytes:
        """ServerHello through ServerHelloDone, valid and in order."""
        flight = self.server_hello() + self.certificate() + self.server_key_exchange()
        if request_certificate:
            flight += self.certificate_request()
        return flight + self.server_hello_done()

    def finished(self, *, corrupt: bool = False) -> bytes:
        """change_cipher_spec, then Finished under the new keys."""
        assert self.pending is not None
        records = self.send(ContentType.change_cipher_spec, b"\x01")
        self.layer.write_cipher = self.pending[1]
        verify_data = finished_verify_data(
            self.suite,
            self.master_secret,
            b"server finished",
            self.hash(bytes(self.transcript)),
        )
        if corrupt:
            verify_data = bytes([verify_data[0] ^ 1]) + verify_data[1:]
        self.server_verify_data = verify_data
        return records + self.handshake(m12.push_finished12(verify_data))

    def new_session_ticket(self, ticket: bytes, hint: int = 3600) -> bytes:
        message = m12.NewSessionTicket12(hint, ticket)
        return self.handshake(m12.push_new_session_ticket12(message))

    def hello_request(self) -> bytes:
        """HelloRequest, which is not part of any transcript."""
        return self.send(ContentType.handshake, m12.push_hello_request())
