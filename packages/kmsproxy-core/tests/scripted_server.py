"""A scripted TLS 1.3 server side for byte-level tests of the client.

`ScriptedServer` responds to one ClientHello message by message, so a test can
send a valid flight, change one byte or one field, reorder messages, or stop
anywhere. It reuses the engine's codecs and key schedule, which the RFC 8448
vector tests check independently; it is not an implementation of TLS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding
from pki import Issued

from kmsproxy.signer import SignatureScheme, sign_with_private_key
from kmsproxy.tls import key_schedule as ks
from kmsproxy.tls import messages as m
from kmsproxy.tls.alerts import AlertDescription
from kmsproxy.tls.client import ClientConnection
from kmsproxy.tls.key_exchange import (
    MLKEM768_ENCAPSULATION_KEY_LENGTH,
    generate_private_key,
    public_key_bytes,
)
from kmsproxy.tls.records import ContentType, RecordCipher, RecordLayer
from kmsproxy.tls.verify import SERVER_CONTEXT, signed_content

_SCHEME_FOR_KEY = {
    "secp256r1": SignatureScheme.ecdsa_secp256r1_sha256,
    "secp384r1": SignatureScheme.ecdsa_secp384r1_sha384,
}


def encapsulate_hybrid(client_share: bytes) -> tuple[bytes, bytes]:
    """Encapsulate to an X25519MLKEM768 client share as a server does; return
    (ML-KEM ciphertext || X25519 public key, ML-KEM secret || X25519 secret)."""
    encapsulation_key = mlkem.MLKEM768PublicKey.from_public_bytes(
        client_share[:MLKEM768_ENCAPSULATION_KEY_LENGTH]
    )
    mlkem_secret, ciphertext = encapsulation_key.encapsulate()
    private_key = x25519.X25519PrivateKey.generate()
    peer = x25519.X25519PublicKey.from_public_bytes(
        client_share[MLKEM768_ENCAPSULATION_KEY_LENGTH:]
    )
    server_share = ciphertext + public_key_bytes(private_key)
    return server_share, mlkem_secret + private_key.exchange(peer)


def plaintext_record(content_type: int, data: bytes) -> bytes:
    return bytes([content_type, 3, 3]) + len(data).to_bytes(2, "big") + data


def split_records(data: bytes) -> list[tuple[int, bytes]]:
    """Split unprotected wire bytes into (type, fragment) without checks."""
    records = []
    while data:
        length = int.from_bytes(data[3:5], "big")
        records.append((data[0], data[5 : 5 + length]))
        data = data[5 + length :]
    return records


@dataclass
class ScriptedServer:
    """The server half of one handshake, one message at a time."""

    identity: Issued
    suite_code: int = ks.CipherSuite.TLS_AES_128_GCM_SHA256
    scheme: SignatureScheme | None = None
    transcript: ks.Transcript = field(default_factory=ks.Transcript)
    client_hello: m.ClientHello | None = None
    client_reader: RecordLayer = field(default_factory=RecordLayer)
    server_cipher: RecordCipher | None = None
    handshake_secrets: tuple[bytes, bytes] = (b"", b"")
    application_secrets: tuple[bytes, bytes] = (b"", b"")
    schedule: ks.KeySchedule | None = None
    retried: bool = False
    # With `selected_identity` set, ServerHello accepts that PSK identity
    # and the key schedule starts from `psk` (a resumed handshake).
    psk: bytes | None = None
    selected_identity: int | None = None

    @property
    def suite(self) -> ks.SuiteParameters:
        return ks.SUITES[ks.CipherSuite(self.suite_code)]

    # Reading what the client sent

    def read_client_hello(self, wire: bytes) -> m.ClientHello:
        """Parse the client's first flight and add its ClientHello."""
        records = [r for r in split_records(wire) if r[0] == ContentType.handshake]
        message = b"".join(fragment for _, fragment in records)
        self.client_hello = m.pull_client_hello(message[4:])
        self.transcript.add(message)
        return self.client_hello

    def client_extension(self, extension_type: int) -> bytes | None:
        assert self.client_hello is not None
        return m.find_extension(self.client_hello.extensions, extension_type)

    def read_client_records(self, wire: bytes) -> list[tuple[int, bytes]]:
        """Decrypt client records under the current client key, skipping CCS."""
        self.client_reader.feed(wire)
        records = []
        for _ in range(1000):
            record = self.client_reader.next_record()
            if record is None:
                break
            if record[0] != ContentType.change_cipher_spec:
                records.append(record)
        return records

    def client_alert(self, wire: bytes) -> AlertDescription:
        """Return the alert description the client's output ends with."""
        records = self.read_client_records(wire)
        content_type, content = records[-1]
        assert content_type == ContentType.alert
        return AlertDescription(content[1])

    # Building the server flight

    def hello_retry_request(
        self, group: int | None, cookie: bytes | None = None
    ) -> bytes:
        assert self.client_hello is not None
        extensions: list[m.Extension] = [
            (m.ExtensionType.supported_versions, b"\x03\x04")
        ]
        if group is not None:
            extensions.append((m.ExtensionType.key_share, group.to_bytes(2, "big")))
        if cookie is not None:
            extensions.append((m.ExtensionType.cookie, m.push_cookie(cookie)))
        hello = m.ServerHello(
            m.HELLO_RETRY_REQUEST_RANDOM,
            self.client_hello.legacy_session_id,
            self.suite_code,
            extensions,
        )
        message = m.push_server_hello(hello)
        if not self.retried:
            self.transcript.replace_with_message_hash(self.suite)
            self.transcript.select_suite(self.suite)
        self.retried = True
        self.transcript.add(message)
        return plaintext_record(ContentType.handshake, message)

    def read_second_client_hello(self, wire: bytes) -> m.ClientHello:
        records = [r for r in split_records(wire) if r[0] == ContentType.handshake]
        message = b"".join(fragment for _, fragment in records)
        self.client_hello = m.pull_client_hello(message[4:])
        self.transcript.add(message)
        return self.client_hello

    def server_hello_message(self, group: int | None = None) -> tuple[bytes, bytes]:
        """Build ServerHello for `group` (default: the client's first share).

        Return (message, shared secret) without touching the transcript.
        """
        shares = m.pull_key_share_client(
            self.client_extension(m.ExtensionType.key_share) or b""
        )
        share = (
            shares[0] if group is None else next(s for s in shares if s.group == group)
        )
        if share.group == m.NamedGroup.X25519MLKEM768:
            server_share, secret = encapsulate_hybrid(share.key_exchange)
            return self.server_hello_with_share(share.group, server_share), secret
        private_key = generate_private_key(m.NamedGroup(share.group))
        if isinstance(private_key, x25519.X25519PrivateKey):
            peer = x25519.X25519PublicKey.from_public_bytes(share.key_exchange)
            secret = private_key.exchange(peer)
        else:
            assert isinstance(private_key, ec.EllipticCurvePrivateKey)
            point = ec.EllipticCurvePublicKey.from_encoded_point(
                private_key.curve, share.key_exchange
            )
            secret = private_key.exchange(ec.ECDH(), point)
        return self.server_hello_with_share(
            share.group, public_key_bytes(private_key)
        ), secret

    def server_hello_with_share(self, group: int, key_exchange: bytes) -> bytes:
        """Build a ServerHello carrying `key_exchange` for `group` as is."""
        assert self.client_hello is not None
        extensions: list[m.Extension] = [
            (m.ExtensionType.supported_versions, b"\x03\x04"),
            (
                m.ExtensionType.key_share,
                m.push_key_share_server(m.KeyShareEntry(group, key_exchange)),
            ),
        ]
        if self.selected_identity is not None:
            extensions.append(
                (
                    m.ExtensionType.pre_shared_key,
                    self.selected_identity.to_bytes(2, "big"),
                )
            )
        hello = m.ServerHello(
            os.urandom(32),
            self.client_hello.legacy_session_id,
            self.suite_code,
            extensions,
        )
        return m.push_server_hello(hello)

    def accept_server_hello(self, message: bytes, secret: bytes) -> bytes:
        """Add a ServerHello, derive the handshake keys, return its record."""
        if not self.retried:
            self.transcript.select_suite(self.suite)
        self.transcript.add(message)
        self.schedule = ks.KeySchedule(self.suite, self.psk)
        self.schedule.set_shared_secret(secret)
        client_secret, server_secret = self.schedule.handshake_traffic_secrets(
            self.transcript.digest()
        )
        self.handshake_secrets = (client_secret, server_secret)
        self.server_cipher = RecordCipher(self.suite, server_secret)
        self.client_reader.read_cipher = RecordCipher(self.suite, client_secret)
        return plaintext_record(ContentType.handshake, message)

    def server_hello(self) -> bytes:
        message, secret = self.server_hello_message()
        return self.accept_server_hello(message, secret)

    def protect(self, content_type: int, content: bytes, padding: int = 0) -> bytes:
        assert self.server_cipher is not None
        return self.server_cipher.seal(ContentType(content_type), content, padding)

    def handshake(self, message: bytes) -> bytes:
        """Add a handshake message to the transcript and protect it."""
        self.transcript.add(message)
        return self.protect(ContentType.handshake, message)

    def encrypted_extensions(
        self, extensions: list[m.Extension] | None = None
    ) -> bytes:
        return self.handshake(
            m.push_encrypted_extensions(m.EncryptedExtensions(extensions or []))
        )

    def certificate_request(
        self,
        schemes: list[int] | None = None,
        authorities: list[bytes] | None = None,
    ) -> bytes:
        extensions: list[m.Extension] = [
            (
                m.ExtensionType.signature_algorithms,
                m.push_uint16_list_extension(
                    schemes or [SignatureScheme.ecdsa_secp256r1_sha256]
                ),
            )
        ]
        if authorities:
            extensions.append(
                (
                    m.ExtensionType.certificate_authorities,
                    m.push_certificate_authorities(authorities),
                )
            )
        return self.handshake(
            m.push_certificate_request(m.CertificateRequest(b"", extensions))
        )

    def certificate_message(self) -> bytes:
        entries = [
            m.CertificateEntry(cert.public_bytes(Encoding.DER))
            for cert in self.identity.chain
        ]
        return m.push_certificate(m.Certificate(b"", entries))

    def certificate(self) -> bytes:
        return self.handshake(self.certificate_message())

    def certificate_verify_message(
        self, scheme: SignatureScheme | None = None
    ) -> bytes:
        key = self.identity.key
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scheme = scheme or _SCHEME_FOR_KEY[key.curve.name]
        content = signed_content(SERVER_CONTEXT, self.transcript.digest())
        signature = sign_with_private_key(key, content, scheme)
        return m.push_certificate_verify(m.CertificateVerify(scheme, signature))

    def certificate_verify(self) -> bytes:
        return self.handshake(self.certificate_verify_message())

    def finished_message(self) -> bytes:
        verify_data = ks.finished_verify_data(
            self.suite, self.handshake_secrets[1], self.transcript.digest()
        )
        return m.push_finished(m.Finished(verify_data))

    def finished(self) -> bytes:
        """Protect the server Finished, then switch to the application keys."""
        record = self.handshake(self.finished_message())
        self.enter_application_keys()
        return record

    def enter_application_keys(self) -> None:
        assert self.schedule is not None
        self.application_secrets = self.schedule.application_traffic_secrets(
            self.transcript.digest()
        )
        self.server_cipher = RecordCipher(self.suite, self.application_secrets[1])

    def flight(self, *, request_certificate: bool = False) -> bytes:
        """EncryptedExtensions through Finished, valid and in order."""
        records = self.encrypted_extensions()
        if request_certificate:
            records += self.certificate_request()
        records += self.certificate() + self.certificate_verify()
        return records + self.finished()

    def read_client_finished(self, wire: bytes) -> list[tuple[int, bytes]]:
        """Decrypt the client's second flight; switch reading to its
        application key."""
        records = self.read_client_records(wire)
        self.client_reader.read_cipher = RecordCipher(
            self.suite, self.application_secrets[0]
        )
        return records


def complete_handshake(
    client: ClientConnection, server: ScriptedServer
) -> list[tuple[int, bytes]]:
    """Run a valid handshake without client authentication."""
    client.start()
    server.read_client_hello(client.data_to_send())
    client.receive_data(server.server_hello() + server.flight())
    return server.read_client_finished(client.data_to_send())
