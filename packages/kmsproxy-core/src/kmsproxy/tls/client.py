"""The sans-IO TLS 1.3 client state machine (RFC 8446, client side only).

Everything that changes the connection state lives here: bytes go in through
`receive_data`, bytes to send come out of `data_to_send`, and what happened
comes out of `next_event`. Nothing here awaits or touches a socket. The one
slow step, the client signature, leaves as a `SignatureRequested` event; the
caller awaits its `Signer` and hands the result to `provide_signature`.

Every protocol violation raises an `Alert` subclass after the alert record
has been queued in `data_to_send`, so the caller sends it, then propagates
the exception. An alert from the server raises `AlertReceived`.
"""

from __future__ import annotations

import enum
import hmac
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..signer import SignatureScheme
from . import messages as m
from .alerts import (
    Alert,
    AlertDescription,
    AlertLevel,
    AlertReceived,
    DecodeError,
    DecryptError,
    IllegalParameter,
    MissingExtension,
    TLSError,
    UnexpectedMessage,
)
from .client_auth import (
    client_certificate_verify_content,
    describe_unmatched_request,
    select_identity,
)
from .config import ClientIdentity, TLSClientConfig
from .events import (
    ApplicationData,
    CloseNotifyReceived,
    Event,
    HandshakeComplete,
    SignatureRequested,
)
from .extensions import (
    ParsedCertificateRequest,
    check_certificate_entry_extensions,
    check_encrypted_extensions,
    check_hello_retry_request_extensions,
    check_server_hello_extensions,
    parse_certificate_request,
)
from .hello import (
    SIGNATURE_ALGORITHMS,
    SUPPORTED_GROUPS,
    build_client_hello,
    build_retry_client_hello,
    check_hello,
    key_share_groups,
)
from .key_exchange import (
    KeySharePrivateKey,
    generate_private_key,
    shared_secret,
)
from .key_schedule import (
    SUITES,
    CipherSuite,
    KeySchedule,
    SuiteParameters,
    Transcript,
    finished_verify_data,
    next_traffic_secret,
)
from .limits import (
    EMPTY_RECORD_CREDIT_BYTES,
    KEY_UPDATE_CREDIT_BYTES,
    MAX_EMPTY_RECORDS,
    MAX_KEY_UPDATES,
    FloodBudget,
)
from .records import ContentType, RecordCipher, RecordLayer
from .resumption import (
    check_selected_identity,
    offer_ticket,
    same_hash,
    ticket_from_message,
    without_ticket,
)
from .session_cache import SessionTicket
from .tls12.client12 import ClientConnection12
from .tls12.offer import add_tls12_offer
from .tls12.session12 import Session12
from .verify import (
    leaf_public_key,
    parse_certificate_chain,
    verify_server_signature,
)

# change_cipher_spec records we drop before the server's Finished. A server
# in middlebox compatibility mode sends one, right after its first
# ServerHello or HelloRetryRequest (RFC 8446 appendix D.4). We allow one
# spare for a server that sends another after a HelloRetryRequest; more
# than that is a flood.
MAX_CHANGE_CIPHER_SPEC_RECORDS = 2

# Records we send under one key before we update it ourselves. RFC 8446
# section 5.5 limits AES-GCM to 2^24.5 full-size records per key.
KEY_UPDATE_AFTER_RECORDS = 2**24


class State(enum.Enum):
    START = enum.auto()
    WAIT_SERVER_HELLO = enum.auto()
    WAIT_ENCRYPTED_EXTENSIONS = enum.auto()
    WAIT_CERTIFICATE_OR_REQUEST = enum.auto()
    WAIT_CERTIFICATE = enum.auto()
    WAIT_CERTIFICATE_VERIFY = enum.auto()
    WAIT_FINISHED = enum.auto()
    WAIT_SIGNATURE = enum.auto()
    CONNECTED = enum.auto()
    CLOSED = enum.auto()
    # The server selected TLS 1.2 and `tls12` runs the connection from here.
    HANDED_OVER = enum.auto()


H = m.HandshakeType

# The handshake messages each state accepts (RFC 8446 appendix A.1).
_EXPECTED_MESSAGES: dict[State, tuple[int, ...]] = {
    State.WAIT_SERVER_HELLO: (H.server_hello,),
    State.WAIT_ENCRYPTED_EXTENSIONS: (H.encrypted_extensions,),
    State.WAIT_CERTIFICATE_OR_REQUEST: (H.certificate_request, H.certificate),
    State.WAIT_CERTIFICATE: (H.certificate,),
    State.WAIT_CERTIFICATE_VERIFY: (H.certificate_verify,),
    State.WAIT_FINISHED: (H.finished,),
    State.CONNECTED: (H.new_session_ticket, H.key_update, H.certificate_request),
}


@dataclass
class _PostHandshakeRequest:
    """A post-handshake CertificateRequest waiting for our signature.

    `transcript` is the handshake transcript plus this CertificateRequest
    and our Certificate (RFC 8446 section 4.4.1, post-handshake case).
    """

    transcript: Transcript
    certificate: bytes
    identity: ClientIdentity
    scheme: SignatureScheme


class ClientConnection:
    """One TLS 1.3 client connection, as a state machine over bytes.

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
        self.state = State.START
        self._random_bytes = random_bytes
        self._generate_key_share = generate_key_share
        self._records = RecordLayer()
        self._tls12: ClientConnection12 | None = None
        self._session12: Session12 | None = None
        self._handshake_buffer = bytearray()
        # Records to send, each `encode` result kept whole until
        # `data_to_send` joins them, so a relay step is copied only there.
        self._output: list[bytes] = []
        self._events: deque[Event] = deque()
        self._transcript = Transcript()
        self._key_shares: dict[int, KeySharePrivateKey] = {}
        self._client_hello: m.ClientHello | None = None
        self._hello_retry_request: m.ServerHello | None = None
        self._suite_code = CipherSuite.TLS_AES_128_GCM_SHA256
        self._suite: SuiteParameters | None = None
        self._schedule: KeySchedule | None = None
        self._client_secret = b""
        self._server_secret = b""
        self._application_client_secret = b""
        self._certificate_request: m.CertificateRequest | None = None
        self._parsed_certificate_request: ParsedCertificateRequest | None = None
        self._main_certificate_requested = False
        self._tickets_received = 0
        self._pending_signature: SignatureRequested | None = None
        # Why we sent an empty Certificate, appended to the message of a
        # later alert. It stays None while every request found an identity.
        self._unmatched_request: str | None = None
        self._sent_change_cipher_spec = False
        self._change_cipher_spec_count = 0
        self._empty_records = FloodBudget(
            "empty records", MAX_EMPTY_RECORDS, EMPTY_RECORD_CREDIT_BYTES
        )
        self._key_updates = FloodBudget(
            "KeyUpdates", MAX_KEY_UPDATES, KEY_UPDATE_CREDIT_BYTES
        )
        self.peer_chain: list[x509.Certificate] = []
        self.client_identity: ClientIdentity | None = None
        self.alpn_protocol: str | None = None
        self.send_closed = False
        self.receive_closed = False
        self.key_updates_received = 0
        self.resumed = False
        self.key_exchange_group: m.NamedGroup | None = None
        self._ticket: SessionTicket | None = None
        self._resumption_master_secret = b""
        self._handshake_transcript: Transcript | None = None
        self._post_handshake_requests: deque[_PostHandshakeRequest] = deque()
        self.post_handshake_authentications = 0

    # Public API

    @property
    def cipher_suite(self) -> str:
        return self._suite_code.name

    @property
    def version(self) -> str:
        return "TLSv1.3"

    @property
    def hello_retry_requested(self) -> bool:
        """True when the server sent a HelloRetryRequest."""
        return self._hello_retry_request is not None

    @property
    def handshake_complete(self) -> bool:
        return self.state == State.CONNECTED

    @property
    def certificate_requested(self) -> bool:
        """True when the server sent a CertificateRequest in the main
        handshake, so it may still reject our certificate with an alert after
        its Finished (RFC 8446 section 4.4.2.4)."""
        return self._main_certificate_requested

    @property
    def tickets_received(self) -> int:
        """How many NewSessionTicket messages the server sent."""
        return self._tickets_received

    @property
    def tls12(self) -> ClientConnection12 | None:
        """The TLS 1.2 machine that took over when the server selected TLS
        1.2, else None. The caller continues with it."""
        return self._tls12

    def start(self) -> None:
        """Queue the ClientHello."""
        if self.state != State.START:
            raise TLSError("the handshake has already started")
        hello = self._build_client_hello()
        self._client_hello = hello
        self._send_handshake(m.push_client_hello(hello))
        self.state = State.WAIT_SERVER_HELLO

    def receive_data(self, data: bytes) -> None:
        """Process received bytes; results appear in `next_event`."""
        self._guarded(self._records.feed, data)

    def provide_signature(self, signature: bytes) -> None:
        """Complete the client flight, or the response to a post-handshake
        CertificateRequest, with the signature a `SignatureRequested` event
        requested. Signatures are consumed in the order of the requests."""
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
        if self.state != State.CONNECTED or self.send_closed:
            raise TLSError("cannot send: the connection is not open for writing")
        write_cipher = self._records.write_cipher
        if write_cipher and write_cipher.sequence_number >= KEY_UPDATE_AFTER_RECORDS:
            self._send_key_update(m.KeyUpdateRequest.update_not_requested)
        self._output.append(self._records.encode(ContentType.application_data, data))

    def send_close_notify(self) -> None:
        """Queue close_notify; receiving continues (TLS 1.3 half-close)."""
        if self.send_closed or self.state == State.CLOSED:
            return
        self.send_closed = True
        self._queue_alert(AlertLevel.warning, AlertDescription.close_notify)

    # Error boundary

    def _guarded(self, step: Callable[[bytes], None], data: bytes) -> None:
        """Run one input step, then process whatever records can be processed.

        Convert stray decoding errors to DecodeError so callers see only
        TLSError subclasses, and queue our alert before re-raising.
        """
        if self.state == State.CLOSED:
            raise TLSError("the connection has already failed or closed")
        try:
            step(data)
            self._process_records()
        except Alert as alert:
            self._fail(alert)
            raise
        except AlertReceived:
            self.state = State.CLOSED
            raise
        except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
            decode_error = DecodeError(f"malformed input: {e}")
            self._fail(decode_error)
            raise decode_error from e

    def fail(self, alert: Alert) -> None:
        """Queue `alert` and close the connection; for failures found
        outside the state machine, such as a Signer error."""
        self._fail(alert)

    def _fail(self, alert: Alert) -> None:
        if not self.send_closed:
            self._queue_alert(AlertLevel.fatal, alert.description)
        self.send_closed = True
        self.state = State.CLOSED

    def _queue_alert(self, level: AlertLevel, description: AlertDescription) -> None:
        self._output.append(
            self._records.encode(ContentType.alert, bytes([level, description]))
        )

    # Record processing

    def _process_records(self) -> None:
        # A record that ended a batch of application data and is not
        # handled yet.
        record: tuple[int, bytes] | None = None
        while self.state not in (
            State.WAIT_SIGNATURE,
            State.CLOSED,
            State.HANDED_OVER,
        ):
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
            if (
                content_type == ContentType.application_data
                and self.state == State.CONNECTED
            ):
                record = self._receive_application_data(content)
                continue
            self._count_empty(content)
            if content_type == ContentType.change_cipher_spec:
                self._receive_change_cipher_spec(content)
            elif content_type == ContentType.alert:
                self._receive_alert(content)
            elif content_type == ContentType.handshake:
                self._handshake_buffer += content
            else:
                raise UnexpectedMessage("application data before the handshake ended")

    def _receive_application_data(self, content: bytes) -> tuple[int, bytes] | None:
        """Deliver `content` and the application data records right after it
        as one `ApplicationData` event. Return the next record of another
        type, or None when no whole record is left.

        The record layer still opens and checks each record on its own, so
        the batch ends exactly where a KeyUpdate or an alert sits. An empty
        record first settles the data before it with the flood budgets and
        then counts against them, as it would one record at a time.
        """
        chunks: list[bytes] = []
        data_length = 0
        record: tuple[int, bytes] | None = (ContentType.application_data, content)
        try:
            while record is not None and record[0] == ContentType.application_data:
                content = record[1]
                if content:
                    chunks.append(content)
                    data_length += len(content)
                else:
                    self._earn_budgets(data_length)
                    data_length = 0
                    self._empty_records.spend()
                record = self._records.next_record()
        finally:
            # Data before a failing record was authenticated, so it is
            # delivered before the error, as it was one record at a time.
            self._earn_budgets(data_length)
            if chunks:
                self._events.append(ApplicationData(b"".join(chunks)))
        return record

    def _earn_budgets(self, data_length: int) -> None:
        if data_length:
            self._empty_records.earn(data_length)
            self._key_updates.earn(data_length)

    def _count_empty(self, content: bytes) -> None:
        if not content:
            self._empty_records.spend()

    def _receive_change_cipher_spec(self, content: bytes) -> None:
        # RFC 8446 section 5: drop a single 0x01 byte received before the
        # server's Finished; anything else is unexpected_message.
        before_finished = self.state in (
            State.WAIT_SERVER_HELLO,
            State.WAIT_ENCRYPTED_EXTENSIONS,
            State.WAIT_CERTIFICATE_OR_REQUEST,
            State.WAIT_CERTIFICATE,
            State.WAIT_CERTIFICATE_VERIFY,
            State.WAIT_FINISHED,
        )
        if content != b"\x01" or not before_finished:
            raise UnexpectedMessage("change_cipher_spec is not allowed here")
        self._change_cipher_spec_count += 1
        if self._change_cipher_spec_count > MAX_CHANGE_CIPHER_SPEC_RECORDS:
            raise UnexpectedMessage(
                f"more than {MAX_CHANGE_CIPHER_SPEC_RECORDS} change_cipher_spec records"
            )

    def _receive_alert(self, content: bytes) -> None:
        # One alert per record, never fragmented (RFC 8446 section 6).
        if len(content) != 2:
            raise DecodeError(f"alert record of {len(content)} bytes, expected 2")
        level, description = content
        if description == AlertDescription.close_notify and self.handshake_complete:
            self.receive_closed = True
            self._events.append(CloseNotifyReceived())
            return
        if description == AlertDescription.user_canceled:
            # Ignored like an empty record, so it counts as one.
            self._empty_records.spend()
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

    def _require_no_buffered_handshake(self, when: str) -> None:
        # Handshake messages must not span a key change (RFC 8446 5.1).
        if self._handshake_buffer:
            raise UnexpectedMessage(f"handshake data continues past {when}")

    # Handshake

    def _handle_handshake(self, message_type: int, message: bytes) -> None:
        body = message[m.HANDSHAKE_HEADER_LENGTH :]
        state = self.state
        expected = _EXPECTED_MESSAGES.get(state, ())
        if message_type not in expected:
            raise UnexpectedMessage(
                f"{_message_name(message_type)} is not allowed in state "
                f"{state.name}; expected {' or '.join(map(_message_name, expected))}"
            )

        if message_type == m.HandshakeType.server_hello:
            self._receive_server_hello(m.pull_server_hello(body), message)
        elif message_type == m.HandshakeType.encrypted_extensions:
            self._receive_encrypted_extensions(body, message)
        elif message_type == m.HandshakeType.certificate_request:
            if state == State.CONNECTED:
                self._receive_post_handshake_request(body, message)
            else:
                self._receive_certificate_request(body, message)
        elif message_type == m.HandshakeType.certificate:
            self._receive_certificate(body, message)
        elif message_type == m.HandshakeType.certificate_verify:
            self._receive_certificate_verify(body, message)
        elif message_type == m.HandshakeType.finished:
            self._receive_finished(body, message)
        elif message_type == m.HandshakeType.new_session_ticket:
            self._receive_new_session_ticket(m.pull_new_session_ticket(body))
        else:
            self._receive_key_update(m.pull_key_update(body))

    def _build_client_hello(self) -> m.ClientHello:
        cache, key = self.config.session_cache, self.config.session_key
        hint = None
        if cache is not None and key is not None:
            hint = cache.key_share_group(key)
        for group in key_share_groups(hint):
            self._key_shares[group] = self._generate_key_share(group)
        hello = build_client_hello(self.config, self._key_shares, self._random_bytes)
        if cache is not None and key is not None:
            self._session12 = cache.take_tls12(key)
        hello = add_tls12_offer(
            hello,
            self._session12,
            request_ticket=cache is not None and key is not None,
        )
        if cache is None or key is None:
            return hello
        self._ticket = cache.take(key)
        if self._ticket is None:
            return hello
        return offer_ticket(hello, self._ticket, self._transcript, cache.clock())

    def _offered_extensions(self) -> set[int]:
        assert self._client_hello is not None
        return {extension_type for extension_type, _ in self._client_hello.extensions}

    def _receive_server_hello(self, hello: m.ServerHello, message: bytes) -> None:
        assert self._client_hello is not None
        extensions = hello.extensions or []
        selects_tls12 = (
            m.find_extension(extensions, m.ExtensionType.supported_versions) is None
            and not hello.is_hello_retry_request
        )
        if selects_tls12:
            if self._hello_retry_request is not None:
                raise IllegalParameter(
                    "server selected TLS 1.2 after a TLS 1.3 HelloRetryRequest"
                )
            self._hand_over_to_tls12(message)
            return
        check_hello(hello, self._client_hello)
        if hello.is_hello_retry_request:
            self._receive_hello_retry_request(hello, message)
            return
        extensions = hello.extensions or []
        check_server_hello_extensions(extensions, self._offered_extensions())
        retry = self._hello_retry_request
        if retry is not None and hello.cipher_suite != retry.cipher_suite:
            raise IllegalParameter(
                "ServerHello cipher suite differs from the HelloRetryRequest's"
            )

        # Step 1: the server's key share must be for a group we sent a share for.
        share_data = m.find_extension(extensions, m.ExtensionType.key_share)
        if share_data is None:
            raise MissingExtension("ServerHello has no key_share")
        share = m.pull_key_share_server(share_data)
        private_key = self._key_shares.get(share.group)
        if private_key is None:
            raise IllegalParameter(
                f"server key share for group 0x{share.group:04x}, which we sent "
                "no share for"
            )

        # Step 2: a selected PSK resumes the ticket's session, which keeps
        # the certificates of the handshake that created it.
        self._suite_code = CipherSuite(hello.cipher_suite)
        psk = None
        psk_data = m.find_extension(extensions, m.ExtensionType.pre_shared_key)
        if psk_data is not None:
            check_selected_identity(psk_data, self._ticket, self._suite_code)
            assert self._ticket is not None
            psk = self._ticket.psk
            self.resumed = True
            self.peer_chain = list(self._ticket.peer_chain)
            self.client_identity = self._ticket.client_identity

        # Step 3: the handshake secrets (RFC 8446 section 7.1).
        suite = SUITES[self._suite_code]
        self._suite = suite
        if retry is None:
            self._transcript.select_suite(suite)
        self._transcript.add(message)
        schedule = KeySchedule(suite, psk)
        schedule.set_shared_secret(
            shared_secret(m.NamedGroup(share.group), private_key, share.key_exchange)
        )
        self._schedule = schedule
        self._key_shares.clear()
        self.key_exchange_group = m.NamedGroup(share.group)
        client_secret, server_secret = schedule.handshake_traffic_secrets(
            self._transcript.digest()
        )
        self._client_secret, self._server_secret = client_secret, server_secret

        # Step 4: switch both directions to the handshake traffic keys.
        self._require_no_buffered_handshake("ServerHello")
        self._records.read_cipher = RecordCipher(suite, server_secret)
        self._records.write_cipher = RecordCipher(suite, client_secret)
        self.state = State.WAIT_ENCRYPTED_EXTENSIONS

    def _hand_over_to_tls12(self, message: bytes) -> None:
        """Give the connection to the TLS 1.2 machine: the ClientHello, this
        ServerHello and every byte received after it."""
        assert self._client_hello is not None
        tls12 = ClientConnection12(
            self.config,
            random_bytes=self._random_bytes,
            generate_key_share=self._generate_key_share,
        )
        self._tls12 = tls12
        self.state = State.HANDED_OVER
        handshake_data = bytes(self._handshake_buffer)
        self._handshake_buffer.clear()
        pending_output = self.data_to_send()
        try:
            tls12.hand_over(
                self._client_hello,
                m.push_client_hello(self._client_hello),
                message,
                handshake_data,
                self._records.take_buffered(),
                session=self._session12,
                pending_output=pending_output,
            )
        except Alert:
            # The TLS 1.2 machine queued its alert; send that one alone.
            alert_record = tls12.data_to_send()
            if alert_record:
                self._output.append(alert_record)
            self.send_closed = True
            raise

    def _receive_hello_retry_request(
        self, hello: m.ServerHello, message: bytes
    ) -> None:
        # RFC 8446 section 4.1.4.
        if self._hello_retry_request is not None:
            raise UnexpectedMessage("second HelloRetryRequest")
        assert self._client_hello is not None
        extensions = hello.extensions or []
        check_hello_retry_request_extensions(extensions, self._offered_extensions())
        selected_data = m.find_extension(extensions, m.ExtensionType.key_share)
        cookie_data = m.find_extension(extensions, m.ExtensionType.cookie)
        if selected_data is None and cookie_data is None:
            raise IllegalParameter("HelloRetryRequest would not change the ClientHello")

        if selected_data is not None:
            group = m.pull_uint16_extension(selected_data, "key_share")
            if group not in SUPPORTED_GROUPS or group in self._key_shares:
                raise IllegalParameter(
                    f"HelloRetryRequest selected group 0x{group:04x}, which is "
                    "unsupported or already has a share"
                )
            self._key_shares = {group: self._generate_key_share(m.NamedGroup(group))}
        cookie = None if cookie_data is None else m.pull_cookie(cookie_data)

        self._hello_retry_request = hello
        self._suite_code = CipherSuite(hello.cipher_suite)
        suite = SUITES[self._suite_code]
        self._transcript.replace_with_message_hash(suite)
        self._transcript.select_suite(suite)
        self._transcript.add(message)
        self._require_no_buffered_handshake("HelloRetryRequest")

        hello2 = build_retry_client_hello(self._client_hello, self._key_shares, cookie)
        ticket, cache = self._ticket, self.config.session_cache
        if ticket is not None and same_hash(ticket.cipher_suite, self._suite_code):
            assert cache is not None
            hello2 = offer_ticket(hello2, ticket, self._transcript, cache.clock())
        elif ticket is not None:
            # The PSK is bound to a hash the server's suite does not use
            # (RFC 8446 section 4.1.2 allows dropping it from ClientHello2).
            self._ticket = None
            hello2 = without_ticket(hello2)
        self._client_hello = hello2
        self._send_change_cipher_spec()
        self._send_handshake(m.push_client_hello(hello2))

    def _receive_encrypted_extensions(self, body: bytes, message: bytes) -> None:
        extensions = m.pull_encrypted_extensions(body).extensions
        self.alpn_protocol = check_encrypted_extensions(
            extensions,
            self._offered_extensions(),
            [p.encode() for p in self.config.alpn_protocols],
        )
        self._transcript.add(message)
        # A resumed handshake has no Certificate, CertificateVerify or
        # CertificateRequest: the PSK authenticates (RFC 8446 section 2.2).
        if self.resumed:
            self.state = State.WAIT_FINISHED
        else:
            self.state = State.WAIT_CERTIFICATE_OR_REQUEST

    def _receive_certificate_request(self, body: bytes, message: bytes) -> None:
        request = m.pull_certificate_request(body)
        self._parsed_certificate_request = parse_certificate_request(request)
        self._certificate_request = request
        self._main_certificate_requested = True
        self._transcript.add(message)
        self.state = State.WAIT_CERTIFICATE

    def _receive_certificate(self, body: bytes, message: bytes) -> None:
        certificate = m.pull_certificate(body)
        if certificate.certificate_request_context:
            raise IllegalParameter(
                "server Certificate has a certificate_request_context"
            )
        if not certificate.certificate_list:
            raise DecodeError("server sent an empty Certificate message")
        for entry in certificate.certificate_list:
            check_certificate_entry_extensions(
                entry.extensions, self._offered_extensions()
            )
        chain = parse_certificate_chain(
            [e.cert_data for e in certificate.certificate_list]
        )
        leaf_public_key(chain[0])
        if self.config.trust is not None:
            self.config.trust.verify_server(chain, self.config.server_name)
        self.peer_chain = chain
        self._transcript.add(message)
        self.state = State.WAIT_CERTIFICATE_VERIFY

    def _receive_certificate_verify(self, body: bytes, message: bytes) -> None:
        verify = m.pull_certificate_verify(body)
        verify_server_signature(
            self.peer_chain[0],
            verify.algorithm,
            verify.signature,
            self._transcript.digest(),
            SIGNATURE_ALGORITHMS,
        )
        self._transcript.add(message)
        self.state = State.WAIT_FINISHED

    def _receive_finished(self, body: bytes, message: bytes) -> None:
        suite, schedule = self._suite, self._schedule
        assert suite is not None
        assert schedule is not None
        finished = m.pull_finished(body, suite.hash_length)
        expected = finished_verify_data(
            suite, self._server_secret, self._transcript.digest()
        )
        if not hmac.compare_digest(finished.verify_data, expected):
            raise DecryptError("server Finished verify_data is wrong")
        self._transcript.add(message)
        cache, key = self.config.session_cache, self.config.session_key
        if cache is not None and key is not None:
            # The server is authenticated now, so its group becomes the hint.
            assert self.key_exchange_group is not None
            cache.put_key_share_group(key, self.key_exchange_group)

        # The application secrets cover the transcript through server Finished.
        client_secret, server_secret = schedule.application_traffic_secrets(
            self._transcript.digest()
        )
        self._require_no_buffered_handshake("server Finished")
        self._records.read_cipher = RecordCipher(suite, server_secret)
        self._application_client_secret = client_secret
        self._server_secret = server_secret
        self._send_change_cipher_spec()
        self._send_client_certificate()

    def _send_client_certificate(self) -> None:
        """Send our Certificate (and ask for a signature) or go to Finished."""
        request = self._certificate_request
        parsed = self._parsed_certificate_request
        if request is None or parsed is None:
            self._send_client_finished()
            return
        selection = select_identity(
            self.config.identities, parsed.signature_algorithms, parsed.authorities
        )
        if selection is None and self.config.identities:
            self._unmatched_request = describe_unmatched_request(
                self.config.identities, parsed.signature_algorithms
            )
        entries = []
        if selection is not None:
            identity, _ = selection
            entries = [
                m.CertificateEntry(cert.public_bytes(Encoding.DER))
                for cert in identity.chain
            ]
        certificate = m.push_certificate(
            m.Certificate(request.certificate_request_context, entries)
        )
        self._send_handshake(certificate)
        if selection is None:
            self._send_client_finished()
            return
        identity, scheme = selection
        self.client_identity = identity
        content = client_certificate_verify_content(self._transcript.digest())
        self._pending_signature = SignatureRequested(identity, scheme, content)
        self._events.append(self._pending_signature)
        self.state = State.WAIT_SIGNATURE

    def _finish_client_flight_with(self, signature: bytes) -> None:
        if self.state == State.CONNECTED and self._post_handshake_requests:
            self._finish_post_handshake_authentication(signature)
            return
        pending = self._pending_signature
        if self.state != State.WAIT_SIGNATURE or pending is None:
            raise TLSError("no signature was requested")
        self._pending_signature = None
        verify = m.CertificateVerify(pending.scheme, signature)
        self._send_handshake(m.push_certificate_verify(verify))
        self._send_client_finished()

    def _send_client_finished(self) -> None:
        suite = self._suite
        assert suite is not None
        verify_data = finished_verify_data(
            suite, self._client_secret, self._transcript.digest()
        )
        self._send_handshake(m.push_finished(m.Finished(verify_data)))
        assert self._schedule is not None
        self._resumption_master_secret = self._schedule.resumption_master_secret(
            self._transcript.digest()
        )
        self._handshake_transcript = self._transcript.copy()
        self._client_secret = self._application_client_secret
        self._records.write_cipher = RecordCipher(suite, self._client_secret)
        self.state = State.CONNECTED
        self._events.append(HandshakeComplete())

    # Post-handshake

    def _receive_new_session_ticket(self, message: m.NewSessionTicket) -> None:
        # RFC 8446 section 4.6.1. max_early_data is ignored: no 0-RTT.
        self._tickets_received += 1
        cache, key = self.config.session_cache, self.config.session_key
        if cache is None or key is None:
            return
        ticket = ticket_from_message(
            message,
            self._suite_code,
            self._resumption_master_secret,
            cache.clock(),
            self.peer_chain,
            self.client_identity,
        )
        if ticket is not None:
            cache.put(key, ticket)

    def _receive_post_handshake_request(self, body: bytes, message: bytes) -> None:
        # RFC 8446 section 4.6.2: only after we offered post_handshake_auth.
        if m.ExtensionType.post_handshake_auth not in self._offered_extensions():
            raise UnexpectedMessage(
                "post-handshake CertificateRequest without post_handshake_auth"
            )
        request = m.pull_certificate_request(body)
        parsed = parse_certificate_request(request, post_handshake=True)
        assert self._handshake_transcript is not None
        transcript = self._handshake_transcript.copy()
        transcript.add(message)
        selection = select_identity(
            self.config.identities, parsed.signature_algorithms, parsed.authorities
        )
        if selection is None and self.config.identities:
            self._unmatched_request = describe_unmatched_request(
                self.config.identities, parsed.signature_algorithms
            )
        entries = []
        if selection is not None:
            entries = [
                m.CertificateEntry(cert.public_bytes(Encoding.DER))
                for cert in selection[0].chain
            ]
        certificate = m.push_certificate(
            m.Certificate(request.certificate_request_context, entries)
        )
        transcript.add(certificate)
        if selection is None:
            # An empty Certificate and Finished, no CertificateVerify.
            self._send_post_handshake_flight(transcript, certificate)
            return
        identity, scheme = selection
        self._post_handshake_requests.append(
            _PostHandshakeRequest(transcript, certificate, identity, scheme)
        )
        content = client_certificate_verify_content(transcript.digest())
        self._events.append(SignatureRequested(identity, scheme, content))

    def _finish_post_handshake_authentication(self, signature: bytes) -> None:
        request = self._post_handshake_requests.popleft()
        verify = m.push_certificate_verify(
            m.CertificateVerify(request.scheme, signature)
        )
        request.transcript.add(verify)
        self.client_identity = request.identity
        self._send_post_handshake_flight(
            request.transcript, request.certificate + verify
        )

    def _send_post_handshake_flight(
        self, transcript: Transcript, messages: bytes
    ) -> None:
        """Queue Certificate (and CertificateVerify) then Finished, whose key
        derives from the current client application traffic secret."""
        suite = self._suite
        assert suite is not None
        verify_data = finished_verify_data(
            suite, self._client_secret, transcript.digest()
        )
        finished = m.push_finished(m.Finished(verify_data))
        self.post_handshake_authentications += 1
        if self.send_closed:
            return
        self._output.append(
            self._records.encode(ContentType.handshake, messages + finished)
        )

    def _receive_key_update(self, update: m.KeyUpdate) -> None:
        # RFC 8446 section 4.6.3.
        suite = self._suite
        assert suite is not None
        self._require_no_buffered_handshake("KeyUpdate")
        self._key_updates.spend()
        self.key_updates_received += 1
        self._server_secret = next_traffic_secret(suite, self._server_secret)
        self._records.read_cipher = RecordCipher(suite, self._server_secret)
        requested = update.request_update == m.KeyUpdateRequest.update_requested
        if requested and not self.send_closed:
            self._send_key_update(m.KeyUpdateRequest.update_not_requested)

    def _send_key_update(self, request: m.KeyUpdateRequest) -> None:
        suite = self._suite
        assert suite is not None
        self._output.append(
            self._records.encode(
                ContentType.handshake, m.push_key_update(m.KeyUpdate(request))
            )
        )
        self._client_secret = next_traffic_secret(suite, self._client_secret)
        self._records.write_cipher = RecordCipher(suite, self._client_secret)

    # Output helpers

    def _send_handshake(self, message: bytes) -> None:
        self._transcript.add(message)
        self._output.append(self._records.encode(ContentType.handshake, message))

    def _send_change_cipher_spec(self) -> None:
        # Middlebox compatibility mode: one unprotected change_cipher_spec
        # before our second flight (RFC 8446 appendix D.4).
        if self._sent_change_cipher_spec:
            return
        self._sent_change_cipher_spec = True
        self._output.append(
            self._records.encode(ContentType.change_cipher_spec, b"\x01", protect=False)
        )


def _message_name(message_type: int) -> str:
    try:
        return m.HandshakeType(message_type).name
    except ValueError:
        return f"handshake type {message_type}"
