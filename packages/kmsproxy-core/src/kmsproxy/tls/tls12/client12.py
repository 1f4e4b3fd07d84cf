"""The sans-IO TLS 1.2 client state machine (RFC 5246, client side only).

Everything that changes a TLS 1.2 connection's state lives here, with the
same interface as the TLS 1.3 `ClientConnection`: bytes in through
`receive_data`, bytes out of `data_to_send`, events out of `next_event`,
and the client signature leaves as a `SignatureRequested` event that the caller
completes with `provide_signature`. A connection starts either from its own TLS 1.2 only
ClientHello (`start`) or from a ServerHello the TLS 1.3 client received
for a ClientHello that offered both versions (`hand_over`).

The full handshake (RFC 5246 section 7.3) with ECDHE only:

    ClientHello          -->
                         <--  ServerHello, Certificate, ServerKeyExchange,
                              [CertificateRequest], ServerHelloDone
    [Certificate], ClientKeyExchange, [CertificateVerify],
    ChangeCipherSpec, Finished  -->
                         <--  [NewSessionTicket], ChangeCipherSpec, Finished

A server HelloRequest after the handshake starts the same exchange again
inside the protected connection (renegotiation, RFC 5746), which is how
servers ask for a client certificate for some paths only.
"""

from __future__ import annotations

import enum
import hmac
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import PublicKeyAlgorithmOID

from ...signer import PublicKey, SignatureScheme, verify_signature
from .. import messages as m
from ..alerts import (
    Alert,
    AlertDescription,
    AlertLevel,
    AlertReceived,
    BadCertificate,
    DecodeError,
    DecryptError,
    IllegalParameter,
    TLSError,
    UnexpectedMessage,
    UnsupportedCertificate,
)
from ..config import ClientIdentity, TLSClientConfig
from ..events import (
    ApplicationData,
    CloseNotifyReceived,
    Event,
    HandshakeComplete,
    SignatureRequested,
)
from ..key_exchange import (
    KeySharePrivateKey,
    generate_private_key,
    public_key_bytes,
    shared_secret,
)
from ..records import ContentType
from ..verify import leaf_public_key, parse_certificate_chain
from .client_auth12 import select_identity12
from .hello12 import (
    GROUPS12,
    Negotiated12,
    build_client_hello12,
    check_server_hello12,
    offered_uint16_list,
)
from .key_schedule12 import (
    Authentication,
    Suite12,
    extended_master_secret,
    finished_verify_data,
    key_block,
)
from .messages12 import (
    Certificate12,
    CertificateRequest12,
    ClientCertificateType,
    HandshakeType12,
    NewSessionTicket12,
    pull_certificate12,
    pull_certificate_request12,
    pull_empty,
    pull_finished12,
    pull_new_session_ticket12,
    pull_server_key_exchange,
    push_certificate12,
    push_client_key_exchange,
    push_finished12,
)
from .records12 import RecordCipher12, RecordLayer12
from .session12 import Session12, ticket_lifetime

# Consecutive records without data (empty application_data, warning alerts
# we skip, ignored HelloRequests) accepted before we call it a flood. RFC
# 5246 sets no bound; 64 matches the TLS 1.3 client's.
MAX_CONSECUTIVE_EMPTY_RECORDS = 64

# Renegotiations we accept per connection. Each may cost a hardware
# signature, and a server that asks for a client certificate per location
# renegotiates once; 16 is our estimate of generous, not a measurement.
MAX_RENEGOTIATIONS = 16

# Records we send under one key before sending fails. TLS 1.2 has no
# KeyUpdate, and RFC 8446 section 5.5 puts the AES-GCM safety limit at
# 2^24.5 full-size records per key. A tunnel that reaches 2^24 records
# (256 GiB) therefore ends instead of rekeying.
MAX_RECORDS_PER_KEY = 2**24

# Application data we hold back while a renegotiation runs, in bytes.
# OpenSSL 3.0 servers reject application data between their ServerHello
# flight and our Finished ("unexpected record"), so data sent meanwhile
# waits for our Finished. 1 MiB is an estimate of what a relay queues in
# one round trip; beyond it sending fails rather than buffer without bound.
MAX_DEFERRED_APPLICATION_DATA = 2**20

# ContentType.change_cipher_spec's only valid content (RFC 5246 7.1).
CHANGE_CIPHER_SPEC = b"\x01"

H = HandshakeType12


class State12(enum.Enum):
    START = enum.auto()
    WAIT_SERVER_HELLO = enum.auto()
    WAIT_CERTIFICATE = enum.auto()
    WAIT_SERVER_KEY_EXCHANGE = enum.auto()
    WAIT_CERTIFICATE_REQUEST_OR_DONE = enum.auto()
    WAIT_SERVER_HELLO_DONE = enum.auto()
    WAIT_SIGNATURE = enum.auto()
    WAIT_NEW_SESSION_TICKET = enum.auto()
    WAIT_CHANGE_CIPHER_SPEC = enum.auto()
    WAIT_FINISHED = enum.auto()
    CONNECTED = enum.auto()
    CLOSED = enum.auto()


# The handshake messages each state accepts (RFC 5246 section 7.3).
# HelloRequest is handled before this table: it is never part of a
# handshake and the client ignores it while negotiating (section 7.4.1.1).
_EXPECTED: dict[State12, tuple[int, ...]] = {
    State12.WAIT_SERVER_HELLO: (H.server_hello,),
    State12.WAIT_CERTIFICATE: (H.certificate,),
    State12.WAIT_SERVER_KEY_EXCHANGE: (H.server_key_exchange,),
    State12.WAIT_CERTIFICATE_REQUEST_OR_DONE: (
        H.certificate_request,
        H.server_hello_done,
    ),
    State12.WAIT_SERVER_HELLO_DONE: (H.server_hello_done,),
    State12.WAIT_NEW_SESSION_TICKET: (H.new_session_ticket,),
    State12.WAIT_FINISHED: (H.finished,),
}

# SHA-1 schemes, which we offer nowhere and reject in ServerKeyExchange
# (RFC 9155 deprecates SHA-1 signatures in TLS 1.2).
_SHA1_SCHEMES = frozenset({SignatureScheme.rsa_pkcs1_sha1, SignatureScheme.ecdsa_sha1})


def _message_name(message_type: int) -> str:
    try:
        return HandshakeType12(message_type).name
    except ValueError:
        return f"handshake type {message_type}"


class ClientConnection12:
    """One TLS 1.2 client connection, as a state machine over bytes.

    `random_bytes` and `generate_key_share` exist so tests can replay fixed
    handshakes; production code keeps the defaults.
    """

    def __init__(
        self,
        config: TLSClientConfig,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        generate_key_share: Callable[
            [m.NamedGroup], KeySharePrivateKey
        ] = generate_private_key,
    ) -> None:
        self.config = config
        self.state = State12.START
        self._random_bytes = random_bytes
        self._generate_key_share = generate_key_share
        self._records = RecordLayer12()
        self._handshake_buffer = bytearray()
        # Records to send, each `encode` result kept whole until
        # `data_to_send` joins them, so a relay step is copied only there.
        self._output: list[bytes] = []
        self._events: deque[Event] = deque()
        self._offered_tls13 = False

        # This handshake.
        self._client_hello: m.ClientHello | None = None
        self._transcript = bytearray()
        self._negotiated: Negotiated12 | None = None
        self._server_random = b""
        self._pre_master_secret = b""
        self._client_public = b""
        self._master_secret = b""
        self._pending_read: RecordCipher12 | None = None
        self._pending_write: RecordCipher12 | None = None
        self._certificate_request: CertificateRequest12 | None = None
        self._pending_signature: SignatureRequested | None = None
        self._session: Session12 | None = None

        # The connection, across renegotiations.
        self._established = False
        self._client_verify_data = b""
        self._server_verify_data = b""
        self._empty_record_count = 0
        self._deferred = bytearray()
        self._defer_sends = False
        self.secure_renegotiation = False
        self.renegotiations = 0
        self.peer_chain: list[x509.Certificate] = []
        self.client_identity: ClientIdentity | None = None
        self.alpn_protocol: str | None = None
        self.session_ticket: NewSessionTicket12 | None = None
        self.send_closed = False
        self.receive_closed = False
        self.resumed = False
        self.key_exchange_group: m.NamedGroup | None = None
        # TLS 1.2 has no KeyUpdate; kept so callers read both versions alike.
        self.key_updates_received = 0
        # Renegotiations that sent a client certificate, the TLS 1.2
        # counterpart of TLS 1.3 post-handshake authentication.
        self.post_handshake_authentications = 0
        self._unmatched_request = ""
        self._sent_certificate = False

    # Public API

    @property
    def version(self) -> str:
        return "TLSv1.2"

    @property
    def cipher_suite(self) -> str:
        if self._negotiated is None:
            return "(none)"
        return self._negotiated.suite.code.name

    @property
    def hello_retry_requested(self) -> bool:
        """Always False: TLS 1.2 has no HelloRetryRequest."""
        return False

    @property
    def handshake_complete(self) -> bool:
        """True once the first handshake has finished, including during a
        later renegotiation."""
        return self._established

    @property
    def renegotiating(self) -> bool:
        return self._established and self.state not in (
            State12.CONNECTED,
            State12.CLOSED,
        )

    def start(self) -> None:
        """Queue a ClientHello that offers TLS 1.2 alone."""
        if self.state != State12.START:
            raise TLSError("the handshake has already started")
        cache, key = self.config.session_cache, self.config.session_key
        ticket = None
        if cache is not None and key is not None:
            self._session = cache.take_tls12(key)
            # An empty extension asks for a ticket (RFC 5077 section 3.2).
            ticket = self._session.ticket if self._session else b""
        hello = build_client_hello12(self.config, self._random_bytes, ticket=ticket)
        self._send_client_hello(hello)

    def hand_over(
        self,
        client_hello: m.ClientHello,
        client_hello_message: bytes,
        server_hello_message: bytes,
        handshake_data: bytes = b"",
        record_data: bytes = b"",
        session: Session12 | None = None,
        pending_output: bytes = b"",
    ) -> None:
        """Continue from a ServerHello that selected TLS 1.2 in response to a
        ClientHello offering TLS 1.3 and 1.2.

        `handshake_data` is what followed the ServerHello in its records,
        `record_data` the received bytes not yet framed as records,
        `session` the session whose ticket the ClientHello offered, and
        `pending_output` bytes the TLS 1.3 client queued but did not send.
        """
        if self.state != State12.START:
            raise TLSError("the handshake has already started")
        if pending_output:
            self._output.append(pending_output)
        self._offered_tls13 = True
        self._session = session
        self._client_hello = client_hello
        self._transcript += client_hello_message
        self.state = State12.WAIT_SERVER_HELLO

        def step(_: bytes) -> None:
            self._handshake_buffer += server_hello_message + handshake_data
            self._records.feed(record_data)

        self._guarded(step, b"")

    def receive_data(self, data: bytes) -> None:
        """Process received bytes; results appear in `next_event`."""
        self._guarded(self._records.feed, data)

    def provide_signature(self, signature: bytes) -> None:
        """Complete our flight with the signature a `SignatureRequested`
        event asked for."""
        self._guarded(self._finish_client_flight_with, signature)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def has_pending_output(self) -> bool:
        """True when `data_to_send` would return bytes."""
        return bool(self._output)

    def data_to_send(self) -> bytes:
        # CPython's bytes.join returns a lone bytes item itself, without a copy.
        data = b"".join(self._output)
        self._output.clear()
        return data

    def send_application_data(self, data: bytes) -> None:
        """Queue application data. During a renegotiation it waits for our
        Finished (see MAX_DEFERRED_APPLICATION_DATA)."""
        if not self._established or self.send_closed or self.state == State12.CLOSED:
            raise TLSError("cannot send: the connection is not open for writing")
        if self._defer_sends:
            if len(self._deferred) + len(data) > MAX_DEFERRED_APPLICATION_DATA:
                raise TLSError(
                    f"more than {MAX_DEFERRED_APPLICATION_DATA} bytes sent while the "
                    "server renegotiates; the server is not completing it"
                )
            self._deferred += data
            return
        self._send_application_data(data)

    def _send_application_data(self, data: bytes) -> None:
        write_cipher = self._records.write_cipher
        if write_cipher and write_cipher.sequence_number >= MAX_RECORDS_PER_KEY:
            raise TLSError(
                f"{MAX_RECORDS_PER_KEY} records sent under one TLS 1.2 key; "
                "open a new connection"
            )
        self._output.append(self._records.encode(ContentType.application_data, data))

    def send_close_notify(self) -> None:
        """Queue close_notify; receiving continues until the server's."""
        if self.send_closed or self.state == State12.CLOSED:
            return
        self.send_closed = True
        self._queue_alert(AlertLevel.warning, AlertDescription.close_notify)

    def fail(self, alert: Alert) -> None:
        """Queue `alert` and close, for failures found outside the state
        machine, such as a Signer error."""
        self._fail(alert)

    # Error boundary

    def _guarded(self, step: Callable[[bytes], None], data: bytes) -> None:
        """Run one input step, then every record that can be processed.

        Stray decoding errors become DecodeError so callers see only
        TLSError subclasses; our alert is queued before re-raising.
        """
        if self.state == State12.CLOSED:
            raise TLSError("the connection has already failed or closed")
        try:
            step(data)
            self._process_records()
        except Alert as alert:
            self._fail(alert)
            raise
        except AlertReceived:
            self.state = State12.CLOSED
            raise
        except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
            decode_error = DecodeError(f"malformed input: {e}")
            self._fail(decode_error)
            raise decode_error from e

    def _fail(self, alert: Alert) -> None:
        if not self.send_closed:
            self._queue_alert(AlertLevel.fatal, alert.description)
        self.send_closed = True
        self.state = State12.CLOSED

    def _queue_alert(self, level: AlertLevel, description: int) -> None:
        self._output.append(
            self._records.encode(ContentType.alert, bytes([level, description]))
        )

    # Records

    def _process_records(self) -> None:
        # A record that ended a batch of application data and is not
        # handled yet.
        record: tuple[int, bytes] | None = None
        while self.state not in (State12.WAIT_SIGNATURE, State12.CLOSED):
            if self.receive_closed:
                return
            if record is None:
                if self._process_one_handshake_message():
                    continue
                record = self._records.next_record()
                if record is None:
                    return
            content_type, content = record
            record = None
            if content_type != ContentType.handshake and self._handshake_buffer:
                raise UnexpectedMessage(
                    f"{ContentType(content_type).name} record inside a fragmented "
                    "handshake message"
                )
            if content_type == ContentType.change_cipher_spec:
                self._receive_change_cipher_spec(content)
            elif content_type == ContentType.alert:
                self._receive_alert(content)
            elif content_type == ContentType.handshake:
                self._handshake_buffer += content
            else:
                record = self._receive_application_data(content)

    def _count_empty(self) -> None:
        self._empty_record_count += 1
        if self._empty_record_count > MAX_CONSECUTIVE_EMPTY_RECORDS:
            raise UnexpectedMessage(
                f"more than {MAX_CONSECUTIVE_EMPTY_RECORDS} records in a row "
                "without data"
            )

    def _receive_application_data(self, content: bytes) -> tuple[int, bytes] | None:
        """Deliver `content` and the application data records right after it
        as one `ApplicationData` event. Return the next record of another
        type, or None when no whole record is left.

        The record layer still opens and checks each record on its own, and
        every empty record still counts, so only the delivery changes.
        """
        # Application data may interleave with a renegotiation, but not sit
        # between the server's change_cipher_spec and Finished (RFC 5246 7.1).
        if not self._established or self.state == State12.WAIT_FINISHED:
            raise UnexpectedMessage(
                f"application data is not allowed in state {self.state.name}"
            )
        chunks: list[bytes] = []
        record: tuple[int, bytes] | None = (ContentType.application_data, content)
        try:
            while record is not None and record[0] == ContentType.application_data:
                content = record[1]
                if content:
                    self._empty_record_count = 0
                    chunks.append(content)
                else:
                    self._count_empty()
                record = self._records.next_record()
        finally:
            # Data before a failing record was authenticated, so it is
            # delivered before the error, as it was one record at a time.
            if chunks:
                self._events.append(ApplicationData(b"".join(chunks)))
        return record

    def _receive_change_cipher_spec(self, content: bytes) -> None:
        if content != CHANGE_CIPHER_SPEC:
            raise DecodeError(f"change_cipher_spec content {content.hex()} is not 01")
        if self.state != State12.WAIT_CHANGE_CIPHER_SPEC:
            raise UnexpectedMessage(
                f"change_cipher_spec is not allowed in state {self.state.name}"
            )
        self._records.read_cipher = self._pending_read
        self._pending_read = None
        self.state = State12.WAIT_FINISHED

    def _receive_alert(self, content: bytes) -> None:
        if len(content) != 2:
            raise DecodeError(f"alert record of {len(content)} bytes, expected 2")
        level, description = content
        if description == AlertDescription.close_notify and self._established:
            self.receive_closed = True
            self._events.append(CloseNotifyReceived())
            return
        if level == AlertLevel.warning and description != AlertDescription.close_notify:
            # TLS 1.2 warnings (unrecognized_name from some servers, or
            # no_renegotiation) do not end the connection (RFC 5246 7.2.2).
            self._count_empty()
            return
        error = AlertReceived(description, level)
        if self._unmatched_request:
            # The alert most likely rejects our empty Certificate, so the
            # message explains why we sent one.
            error.args = (f"{error}; {self._unmatched_request}",)
        raise error

    def _process_one_handshake_message(self) -> bool:
        """Handle the next whole handshake message in the buffer, if any."""
        message = m.pop_handshake_message(self._handshake_buffer)
        if message is None:
            return False
        self._handle_handshake(message[0], message)
        return True

    # Handshake

    def _handle_handshake(self, message_type: int, message: bytes) -> None:
        body = message[m.HANDSHAKE_HEADER_LENGTH :]
        state = self.state
        if message_type == H.hello_request and state != State12.WAIT_FINISHED:
            pull_empty(body, "HelloRequest")
            self._receive_hello_request()
            return
        expected = _EXPECTED.get(state, ())
        if message_type not in expected:
            names = " or ".join(map(_message_name, expected)) or "no handshake message"
            raise UnexpectedMessage(
                f"{_message_name(message_type)} is not allowed in state "
                f"{state.name}; expected {names}"
            )
        self._empty_record_count = 0
        if message_type == H.server_hello:
            self._receive_server_hello(m.pull_server_hello(body), message)
        elif message_type == H.certificate:
            self._receive_certificate(pull_certificate12(body), message)
        elif message_type == H.server_key_exchange:
            self._receive_server_key_exchange(body, message)
        elif message_type == H.certificate_request:
            self._certificate_request = pull_certificate_request12(body)
            self._transcript += message
            self.state = State12.WAIT_SERVER_HELLO_DONE
        elif message_type == H.server_hello_done:
            pull_empty(body, "ServerHelloDone")
            self._transcript += message
            self._send_client_flight()
        elif message_type == H.new_session_ticket:
            self.session_ticket = pull_new_session_ticket12(body)
            self._transcript += message
            self.state = State12.WAIT_CHANGE_CIPHER_SPEC
        else:
            self._receive_finished(pull_finished12(body), message)

    def _send_client_hello(self, hello: m.ClientHello) -> None:
        self._client_hello = hello
        self._sent_certificate = False
        message = m.push_client_hello(hello)
        self._transcript = bytearray(message)
        self._output.append(self._records.encode(ContentType.handshake, message))
        self.state = State12.WAIT_SERVER_HELLO

    def _receive_hello_request(self) -> None:
        """Renegotiate (RFC 5246 7.4.1.1, RFC 5746 section 3.5), or send
        no_renegotiation."""
        self._count_empty()
        if self.state != State12.CONNECTED or self.send_closed:
            return
        if not self.secure_renegotiation or self.renegotiations >= MAX_RENEGOTIATIONS:
            # RFC 5746 section 4.2: without secure renegotiation a client
            # must not renegotiate; no_renegotiation lets the server decide.
            self._queue_alert(AlertLevel.warning, AlertDescription.no_renegotiation)
            return
        self.renegotiations += 1
        # ALPN is a property of the connection, chosen once (RFC 7301 3.1).
        hello = build_client_hello12(
            self.config,
            self._random_bytes,
            renegotiated_connection=self._client_verify_data,
            offer_alpn=False,
        )
        self._certificate_request = None
        self._defer_sends = True
        self._send_client_hello(hello)

    def _receive_server_hello(self, hello: m.ServerHello, message: bytes) -> None:
        client_hello = self._client_hello
        assert client_hello is not None
        if m.find_extension(hello.extensions or [], m.ExtensionType.supported_versions):
            raise IllegalParameter("TLS 1.2 ServerHello contains supported_versions")
        negotiated = check_server_hello12(
            hello,
            client_hello,
            offered_tls13=self._offered_tls13,
            renegotiation_info=self._client_verify_data + self._server_verify_data,
        )
        self._negotiated = negotiated
        self._server_random = hello.random
        if not self._established:
            self.secure_renegotiation = negotiated.secure_renegotiation
            self.alpn_protocol = negotiated.alpn_protocol
        self._transcript += message
        if negotiated.session_id_echoed:
            self._resume(negotiated)
        else:
            self.state = State12.WAIT_CERTIFICATE

    def _resume(self, negotiated: Negotiated12) -> None:
        """Enter the abbreviated handshake (RFC 5077 section 3.1): the
        server echoed the session ID sent with our ticket, so the keys come
        from the stored master secret and the server finishes first."""
        session = self._session
        if session is None or self._established:
            raise IllegalParameter("server resumed a session we did not offer")
        if negotiated.suite.code != session.cipher_suite:
            # RFC 5246 section 7.4.1.3: a resumed session keeps its suite.
            raise IllegalParameter(
                f"server resumed a {session.cipher_suite.name} session with "
                f"{negotiated.suite.code.name}"
            )
        self.resumed = True
        self.peer_chain = list(session.peer_chain)
        self.client_identity = session.client_identity
        self._master_secret = session.master_secret
        self._derive_pending_keys()
        if negotiated.ticket_expected:
            self.state = State12.WAIT_NEW_SESSION_TICKET
        else:
            self.state = State12.WAIT_CHANGE_CIPHER_SPEC

    def _receive_certificate(self, certificate: Certificate12, message: bytes) -> None:
        if not certificate.certificate_list:
            raise DecodeError("server sent an empty Certificate message")
        chain = parse_certificate_chain(certificate.certificate_list)
        key = leaf_public_key(chain[0])
        suite = self._suite
        if suite.authentication == Authentication.RSA:
            fits = isinstance(key, rsa.RSAPublicKey)
        else:
            fits = isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
        if not fits:
            raise UnsupportedCertificate(
                f"server key {type(key).__name__} does not fit {suite.code.name}"
            )
        if self._established and chain[0] != self.peer_chain[0]:
            # A different server certificate on renegotiation would switch
            # the peer in the middle of a connection.
            raise BadCertificate("server certificate changed during renegotiation")
        if self.config.trust is not None:
            self.config.trust.verify_server(chain, self.config.server_name)
        self.peer_chain = chain
        self._transcript += message
        self.state = State12.WAIT_SERVER_KEY_EXCHANGE

    def _receive_server_key_exchange(self, body: bytes, message: bytes) -> None:
        exchange = pull_server_key_exchange(body)
        client_hello = self._client_hello
        assert client_hello is not None

        # Step 1: a group and a scheme we offered (RFC 8422 section 5.4).
        groups = offered_uint16_list(client_hello, m.ExtensionType.supported_groups)
        if exchange.named_curve not in groups or exchange.named_curve not in GROUPS12:
            raise IllegalParameter(
                f"ServerKeyExchange uses group 0x{exchange.named_curve:04x}, which "
                "we did not offer for TLS 1.2"
            )
        schemes = offered_uint16_list(
            client_hello, m.ExtensionType.signature_algorithms
        )
        if exchange.algorithm not in schemes or exchange.algorithm in _SHA1_SCHEMES:
            raise IllegalParameter(
                f"ServerKeyExchange signed with 0x{exchange.algorithm:04x}, which "
                "we did not offer"
            )
        scheme = SignatureScheme(exchange.algorithm)

        # Step 2: the signature over both randoms and the parameters.
        leaf = self.peer_chain[0]
        key = leaf_public_key(leaf)
        _check_scheme_fits_key12(scheme, leaf, key)
        assert self._client_hello is not None
        signed = self._client_hello.random + self._server_random + exchange.params
        try:
            verify_signature(key, exchange.signature, signed, scheme)
        except (InvalidSignature, ValueError):
            raise DecryptError(
                f"ServerKeyExchange signature ({scheme.name}) is invalid"
            ) from None

        # Step 3: our share and the premaster secret (RFC 8422 5.10).
        group = m.NamedGroup(exchange.named_curve)
        private_key = self._generate_key_share(group)
        self._pre_master_secret = shared_secret(group, private_key, exchange.public)
        self.key_exchange_group = group
        self._client_public = public_key_bytes(private_key)
        self._transcript += message
        self.state = State12.WAIT_CERTIFICATE_REQUEST_OR_DONE

    @property
    def _suite(self) -> Suite12:
        assert self._negotiated is not None
        return self._negotiated.suite

    def _hash(self, data: bytes) -> bytes:
        digest = hashes.Hash(self._suite.hash_factory())
        digest.update(data)
        return digest.finalize()

    def _send_handshake(self, message: bytes) -> None:
        self._transcript += message
        self._output.append(self._records.encode(ContentType.handshake, message))

    def _send_client_flight(self) -> None:
        """Send Certificate (when asked), ClientKeyExchange, and either ask
        for the CertificateVerify signature or finish."""
        # Step 1: our certificate, possibly none (RFC 5246 section 7.4.6).
        selection = None
        request = self._certificate_request
        if request is not None:
            selection = select_identity12(self.config.identities, request)
            if selection is None and self.config.identities:
                self._unmatched_request = _describe_mismatch(
                    self.config.identities, request
                )
            chain = selection[0].chain if selection else ()
            certificate = Certificate12([c.public_bytes(Encoding.DER) for c in chain])
            self._send_handshake(push_certificate12(certificate))
        self._send_handshake(push_client_key_exchange(self._client_public))

        # Step 2: the master secret over the session hash through
        # ClientKeyExchange (RFC 7627 section 4), then the key block.
        suite = self._suite
        assert self._client_hello is not None
        self._master_secret = extended_master_secret(
            suite, self._pre_master_secret, self._hash(bytes(self._transcript))
        )
        self._pre_master_secret = b""
        self._derive_pending_keys()

        # Step 3: CertificateVerify signs every handshake message so far
        # (RFC 5246 section 7.4.8); the caller's Signer produces it.
        if selection is None:
            self._send_client_finished()
            return
        identity, scheme = selection
        self.client_identity = identity
        self._sent_certificate = True
        self._pending_signature = SignatureRequested(
            identity, scheme, bytes(self._transcript)
        )
        self._events.append(self._pending_signature)
        self.state = State12.WAIT_SIGNATURE

    def _derive_pending_keys(self) -> None:
        """Derive the keys each side uses after its change_cipher_spec."""
        suite = self._suite
        assert self._client_hello is not None
        keys = key_block(
            suite, self._master_secret, self._client_hello.random, self._server_random
        )
        self._pending_write = RecordCipher12(suite, keys.client_key, keys.client_iv)
        self._pending_read = RecordCipher12(suite, keys.server_key, keys.server_iv)

    def _finish_client_flight_with(self, signature: bytes) -> None:
        pending = self._pending_signature
        if self.state != State12.WAIT_SIGNATURE or pending is None:
            raise TLSError("no signature was requested")
        self._pending_signature = None
        verify = m.CertificateVerify(pending.scheme, signature)
        self._send_handshake(m.push_certificate_verify(verify))
        self._send_client_finished()

    def _send_client_finished(self) -> None:
        self._output.append(
            self._records.encode(ContentType.change_cipher_spec, CHANGE_CIPHER_SPEC)
        )
        self._records.write_cipher = self._pending_write
        self._pending_write = None
        verify_data = finished_verify_data(
            self._suite,
            self._master_secret,
            b"client finished",
            self._hash(bytes(self._transcript)),
        )
        self._send_handshake(push_finished12(verify_data))
        self._client_verify_data = verify_data
        self._defer_sends = False
        if self._deferred:
            self._send_application_data(bytes(self._deferred))
            self._deferred.clear()
        assert self._negotiated is not None
        if self.resumed and not self._established:
            self._complete_handshake()
        elif self._negotiated.ticket_expected:
            self.state = State12.WAIT_NEW_SESSION_TICKET
        else:
            self.state = State12.WAIT_CHANGE_CIPHER_SPEC

    def _receive_finished(self, verify_data: bytes, message: bytes) -> None:
        expected = finished_verify_data(
            self._suite,
            self._master_secret,
            b"server finished",
            self._hash(bytes(self._transcript)),
        )
        if not hmac.compare_digest(verify_data, expected):
            raise DecryptError("server Finished verify_data is wrong")
        if self._handshake_buffer:
            raise UnexpectedMessage("handshake data continues past server Finished")
        self._server_verify_data = verify_data
        self._transcript += message
        if self.resumed and not self._established:
            # The abbreviated handshake: our Finished comes second.
            self._send_client_finished()
        else:
            self._complete_handshake()

    def _complete_handshake(self) -> None:
        if self._established and self._sent_certificate:
            self.post_handshake_authentications += 1
        self._unmatched_request = ""
        self._transcript.clear()
        self._store_session()
        self._store_group_hint()
        self._established = True
        self.state = State12.CONNECTED
        self._events.append(HandshakeComplete())

    def _store_group_hint(self) -> None:
        """Store the ServerKeyExchange group as the group hint, so the next
        ClientHello to this upstream generates one share instead of the
        hybrid and x25519. A resumed handshake has no key exchange, so it
        stores the group of the full handshake that created its session.
        That follows the TLS 1.3 rule: every handshake stores its group, and
        the cache lets a hint expire one lifetime after it first stored it."""
        cache, key = self.config.session_cache, self.config.session_key
        group = self._session_group()
        if cache is None or key is None or group is None or self._established:
            return
        cache.put_key_share_group(key, group)

    def _session_group(self) -> m.NamedGroup | None:
        """Return the ServerKeyExchange group of this session's full
        handshake: this one's, or the resumed session's."""
        if self.resumed:
            return self._session.key_exchange_group if self._session else None
        return self.key_exchange_group

    def _store_session(self) -> None:
        """Keep the session for resumption: with the server's new ticket,
        or with the ticket just used when the server sent none."""
        cache, key = self.config.session_cache, self.config.session_key
        if cache is None or key is None or self._established:
            return
        ticket = self.session_ticket
        if ticket is not None and not ticket.ticket:
            # RFC 5077 section 3.3: an empty ticket means none is issued.
            return
        if ticket is None:
            if self.resumed and self._session is not None:
                cache.put_tls12(key, self._session)
            return
        session = Session12(
            ticket=ticket.ticket,
            master_secret=self._master_secret,
            cipher_suite=self._suite.code,
            lifetime=ticket_lifetime(ticket.ticket_lifetime_hint),
            received_at=cache.clock(),
            peer_chain=tuple(self.peer_chain),
            client_identity=self.client_identity,
            key_exchange_group=self._session_group(),
        )
        cache.put_tls12(key, session)


def _describe_mismatch(
    identities: Sequence[ClientIdentity], request: CertificateRequest12
) -> str:
    """Name what the server accepts and what our identities offer."""
    accepted = [_scheme_name(s) for s in request.signature_algorithms]
    types = [_certificate_type_name(t) for t in request.certificate_types]
    offered = sorted({s.name for i in identities for s in i.signer.schemes})
    return (
        "we sent no client certificate because no identity fits the server's "
        f"CertificateRequest: the server accepts {', '.join(accepted)} for "
        f"certificate types {', '.join(types)}; our keys offer {', '.join(offered)}"
    )


def _scheme_name(code: int) -> str:
    try:
        return SignatureScheme(code).name
    except ValueError:
        return f"0x{code:04x}"


def _certificate_type_name(code: int) -> str:
    try:
        return ClientCertificateType(code).name
    except ValueError:
        return str(code)


def _check_scheme_fits_key12(
    scheme: SignatureScheme, leaf: x509.Certificate, key: PublicKey
) -> None:
    """Raise `IllegalParameter` when the server's key cannot sign with
    `scheme` (RFC 5246 section 7.4.1.4.1, RFC 8422 section 5.4)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        fits = scheme.is_ecdsa
    elif isinstance(key, rsa.RSAPublicKey):
        if leaf.public_key_algorithm_oid == PublicKeyAlgorithmOID.RSASSA_PSS:
            fits = scheme.name.startswith("rsa_pss_pss")
        else:
            fits = scheme.is_rsa_pkcs1 or scheme.name.startswith("rsa_pss_rsae")
    elif isinstance(key, ed25519.Ed25519PublicKey):
        fits = scheme == SignatureScheme.ed25519
    elif isinstance(key, ed448.Ed448PublicKey):
        fits = scheme == SignatureScheme.ed448
    else:
        fits = False
    if not fits:
        raise IllegalParameter(
            f"server signed with {scheme.name}, which does not fit its "
            f"{type(key).__name__}"
        )
