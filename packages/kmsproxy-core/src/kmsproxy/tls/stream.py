"""The anyio byte stream over the sans-IO client: `connect_tls` and
`TLSClientStream`.

This module moves bytes between the transport and `ClientConnection` and
awaits the `Signer`; every protocol decision is made in `client.py`. One
lock orders writes to the transport, so a KeyUpdate response queued by
`receive` and application data from `send` leave in the order they were
encrypted even when two tasks share the stream.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
from cryptography import x509

from ..metrics import metrics
from ..signer import SignerError
from .alerts import Alert, ConnectionLost, HandshakeTimeout, SignatureFailed, TLSError
from .client import ClientConnection
from .config import ClientIdentity, TLSClientConfig
from .events import (
    ApplicationData,
    CloseNotifyReceived,
    HandshakeComplete,
    SignatureRequested,
)
from .records import MAX_PLAINTEXT_LENGTH
from .tls12.client12 import ClientConnection12
from .tls12.offer import offers_tls12_only

logger = logging.getLogger(__name__)

# The sans-IO machine under a stream: TLS 1.3, which hands over to TLS 1.2
# when the server selects it, or TLS 1.2 alone for keys TLS 1.3 cannot use.
Connection = ClientConnection | ClientConnection12

# Time aclose() waits to send close_notify before closing the transport
# anyway, so a peer that stopped reading cannot hold the close for long.
CLOSE_NOTIFY_TIMEOUT_SECONDS = 1.0

# Bytes requested from the transport per read: 16 maximal TLS records
# (2^14 + 256 bytes of ciphertext plus a 5-byte header each). Each read has
# a fixed cost (a system call and a turn of the event loop) besides the
# copy, so a bulk transfer takes many records per read.
TRANSPORT_READ_SIZE = 16 * (2**14 + 256 + 5)

# Plaintext bytes encrypted per turn of the send lock: 16 full records.
# `send` releases the lock between batches so that a handshake flight
# queued meanwhile goes out after at most this much data.
SEND_BATCH_BYTES = 16 * MAX_PLAINTEXT_LENGTH

# Time a shielded write of control records (alerts, KeyUpdate, the response
# to a post-handshake CertificateRequest) may take. These are a few hundred
# bytes to a few KiB, so only a peer that stopped reading reaches this.
CONTROL_WRITE_TIMEOUT_SECONDS = 10.0


async def connect_tls(
    transport: anyio.abc.ByteStream, config: TLSClientConfig
) -> TLSClientStream:
    """Run the client handshake over an open transport.

    On failure raise a `TLSError` subclass (after sending our alert, if the
    failure is ours) and leave closing the transport to the caller. A
    handshake that outlasts `config.handshake_timeout` raises
    `HandshakeTimeout`.
    """
    connection: Connection
    if offers_tls12_only(config):
        connection = ClientConnection12(config)
    else:
        connection = ClientConnection(config)
    stream = TLSClientStream(transport, connection)
    try:
        with anyio.fail_after(config.handshake_timeout):
            await stream._run_handshake()
    except TimeoutError:
        raise HandshakeTimeout(
            f"TLS handshake with {config.server_name!r} timed out after "
            f"{config.handshake_timeout} s"
        ) from None
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
        raise ConnectionLost(
            f"connection to {config.server_name!r} failed during the TLS "
            f"handshake: {error!r}"
        ) from error
    return stream


class TLSClientStream(anyio.abc.ByteStream):
    """Application data over TLS 1.3 or TLS 1.2 on top of `transport`."""

    def __init__(self, transport: anyio.abc.ByteStream, connection: Connection) -> None:
        self.transport = transport
        self._connection = connection
        # `fast_acquire`: an uncontended acquire takes no turn of the event
        # loop, because the transport's receive and send yield anyway.
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._receive_lock = anyio.Lock(fast_acquire=True)
        # Decrypted application data not yet returned, as received chunks
        # joined once by `_take_received`, and their total length.
        self._received: list[bytes] = []
        self._received_length = 0
        self._close_notify_received = False
        self._write_interrupted = False
        # Whether the server sent application data or close_notify after
        # the handshake; see `client_certificate_pending`.
        self._server_sent_data = False

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The transport's typed attributes (addresses, socket), passed
        through so callers can log where a tunnel goes."""
        return self.transport.extra_attributes

    @property
    def connection(self) -> Connection:
        """The sans-IO state machine, for diagnostics; do not feed it."""
        return self._connection

    @property
    def version(self) -> str:
        return self._connection.version

    @property
    def cipher_suite(self) -> str:
        return self._connection.cipher_suite

    @property
    def alpn_protocol(self) -> str | None:
        return self._connection.alpn_protocol

    @property
    def peer_chain(self) -> list[x509.Certificate]:
        """The server's chain, leaf first; on a resumed connection, the chain
        of the full handshake that created the session."""
        return self._connection.peer_chain

    @property
    def resumed(self) -> bool:
        """True when the server accepted a session ticket (no signature)."""
        return self._connection.resumed

    @property
    def client_identity(self) -> ClientIdentity | None:
        return self._connection.client_identity

    @property
    def client_certificate_pending(self) -> bool:
        """True while the server may still reject our client certificate.

        In TLS 1.3 the server reads our Certificate after sending its
        Finished, so a rejection arrives as an alert after the handshake
        (RFC 8446 section 2, Figure 1). A NewSessionTicket shows that the
        server has read our Certificate, CertificateVerify and Finished,
        because after a CertificateRequest the resumption secret covers them
        (RFC 8446 section 4.6.1). OpenSSL, Go's crypto/tls and Python's
        `ssl` check the chain while they read the Certificate, before any
        ticket. Application data ends the pending state too, because it has
        to be relayed, although a server may send data before reading our
        flight (section 4.4.4). In TLS 1.2 the server's Finished follows our
        certificate, and a resumed handshake sends none, so neither is ever
        pending.
        """
        connection = self._connection
        return (
            isinstance(connection, ClientConnection)
            and connection.certificate_requested
            and connection.tickets_received == 0
            and not self._server_sent_data
        )

    async def receive_after_handshake(self, max_bytes: int = 65536) -> bytes:
        """Wait until the server sends anything after the handshake.

        Return up to `max_bytes` of application data, or b"" when the server
        sent a NewSessionTicket instead, or at once when nothing is pending
        (see `client_certificate_pending`). Raise as `receive` does:
        `AlertReceived` for a rejection, `anyio.EndOfStream` after a
        close_notify with no data before it.
        """
        async with self._receive_lock:
            while self.client_certificate_pending:
                event = self._connection.next_event()
                if event is None:
                    await self._feed(await self._read_transport("after the handshake"))
                elif isinstance(event, SignatureRequested):
                    # The caller's deadline must not cancel a signature the
                    # server is waiting for: the request would stay
                    # unanswered. NOTE: the shield also holds up the
                    # tunnel's teardown and SIGTERM until the Signer's own
                    # time limit, as when it waits for a touch.
                    with anyio.CancelScope(shield=True):
                        await self._respond_to_post_handshake_request(event)
                else:
                    self._take(event)
            if self._received:
                return self._take_received(max_bytes)
            if self._close_notify_received:
                raise anyio.EndOfStream
            return b""

    async def _flush(self) -> None:
        """Send what the connection has queued, unless another task is sending.

        The task that holds the send lock sends everything queued before it
        releases the lock (`_send_queued`), so nothing waits for the lock
        here. Waiting would stop `receive` from reading while `send` waits for
        a peer that stops reading until we read, and neither would move.
        """
        if self._send_lock.locked() or not self._connection.has_pending_output:
            return
        async with self._send_lock:
            # Control records (alerts, KeyUpdate and post-handshake
            # responses) are small, so shielding their write from an outer
            # timeout rarely delays it; a write cut short would corrupt the
            # stream.
            try:
                with anyio.CancelScope(shield=True):
                    with anyio.fail_after(CONTROL_WRITE_TIMEOUT_SECONDS):
                        await self._send_queued()
            except TimeoutError:
                raise anyio.BrokenResourceError(
                    f"writing TLS control records to {self._server_name!r} "
                    f"timed out after {CONTROL_WRITE_TIMEOUT_SECONDS} s; the "
                    "server stopped reading"
                ) from None

    async def _send_queued(self) -> None:
        """Send queued bytes until none are left; the caller holds the lock.

        A write interrupted by cancellation or an error may have sent part
        of a record, so the stream is marked broken and later writes raise
        `anyio.BrokenResourceError` rather than send a corrupt record stream.
        """
        while self._connection.has_pending_output:
            if self._write_interrupted:
                raise anyio.BrokenResourceError(
                    "an earlier write to the transport was interrupted, so the "
                    "TLS record stream cannot continue"
                )
            data = self._connection.data_to_send()
            try:
                await self.transport.send(data)
            except BaseException:
                self._write_interrupted = True
                raise

    @property
    def _server_name(self) -> str:
        return self._connection.config.server_name

    async def _flush_alert(self) -> None:
        """Send a queued alert on a best-effort basis: the error that made
        it matters more than a failure to deliver it.

        The send is shielded from the caller's cancellation, so a caller's
        deadline that passes meanwhile does not replace that error with a
        cancellation. NOTE: `_flush` shields its own writes up to
        CONTROL_WRITE_TIMEOUT_SECONDS, so a peer that stops reading delays
        this by up to that long, not CLOSE_NOTIFY_TIMEOUT_SECONDS.
        """
        with contextlib.suppress(
            anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
        ):
            with anyio.move_on_after(CLOSE_NOTIFY_TIMEOUT_SECONDS, shield=True):
                await self._flush()

    async def _feed(self, data: bytes) -> None:
        try:
            self._connection.receive_data(data)
        except Alert:
            await self._flush_alert()
            raise
        self._follow_hand_over()
        await self._flush()

    def _follow_hand_over(self) -> None:
        """Continue with the TLS 1.2 machine once the server selected 1.2."""
        connection = self._connection
        if isinstance(connection, ClientConnection) and connection.tls12 is not None:
            self._connection = connection.tls12

    async def _read_transport(self, during: str) -> bytes:
        try:
            return await self.transport.receive(TRANSPORT_READ_SIZE)
        except anyio.EndOfStream:
            raise ConnectionLost(
                f"server closed the connection {during} without close_notify"
            ) from None
        except (anyio.BrokenResourceError, OSError) as error:
            raise ConnectionLost(f"connection failed {during}: {error}") from error

    async def _run_handshake(self) -> None:
        self._connection.start()
        await self._flush()
        while True:
            connection = self._connection
            event = connection.next_event()
            if event is None:
                await self._feed(await self._read_transport("during the handshake"))
            elif isinstance(event, SignatureRequested):
                signature = await self._sign(event)
                try:
                    connection.provide_signature(signature)
                except Alert:
                    await self._flush_alert()
                    raise
                await self._flush()
            elif isinstance(event, HandshakeComplete):
                metrics.count_handshake(resumed=connection.resumed)
                logger.debug(
                    "TLS handshake complete server_name=%s cipher_suite=%s "
                    "resumed=%s alpn=%s client_identity=%s",
                    connection.config.server_name,
                    connection.cipher_suite,
                    connection.resumed,
                    connection.alpn_protocol,
                    connection.client_identity.signer.uri
                    if connection.client_identity
                    else None,
                )
                return
            else:
                self._take(event)

    async def _sign(self, request: SignatureRequested) -> bytes:
        """Await the Signer, bounded by `config.signature_timeout`.

        Any exception from the Signer, a plugin's code, becomes
        `SignatureFailed` with the exception as its cause, after the
        internal_error alert is sent. Cancellation still propagates.
        """
        signer = request.identity.signer
        timeout = self._connection.config.signature_timeout
        metrics.count_signer_call()
        started = time.perf_counter()
        try:
            with anyio.fail_after(timeout):
                signature = await signer.sign(request.content, request.scheme)
        except TimeoutError as error:
            reason = f"timed out after {timeout} s"
            cause: BaseException = error
        except Exception as error:
            # A backend's message names the key URI, as the message below
            # does, so the URI is left out here to name it once.
            detail = str(error).removeprefix(f"{signer.uri}: ")
            reason = f"failed: {detail}"
            if not isinstance(error, SignerError | ValueError):
                reason = f"failed: {type(error).__name__}: {detail}"
            cause = error
        else:
            logger.debug(
                "signed CertificateVerify key=%s scheme=%s ms=%.1f",
                signer.uri,
                request.scheme.name,
                (time.perf_counter() - started) * 1000,
            )
            return signature
        failure = SignatureFailed(
            f"{signer.uri}: signing CertificateVerify with "
            f"{request.scheme.name} {reason}"
        )
        self._connection.fail(failure)
        await self._flush_alert()
        raise failure from cause

    def _take(self, event: object) -> None:
        if isinstance(event, ApplicationData):
            self._received.append(event.data)
            self._received_length += len(event.data)
            self._server_sent_data = True
        elif isinstance(event, CloseNotifyReceived):
            self._close_notify_received = True
            self._server_sent_data = True

    async def _respond_to_post_handshake_request(
        self, event: SignatureRequested
    ) -> None:
        """Sign for a post-handshake CertificateRequest (RFC 8446 section
        4.6.2) and send Certificate, CertificateVerify and Finished. Other
        tasks may send application data meanwhile.

        NOTE: this runs inside `receive`. Data the server sends after its
        CertificateRequest is delivered only after the signature, so a
        signer that waits for a touch stalls that direction.
        """
        signature = await self._sign(event)
        try:
            self._connection.provide_signature(signature)
        except Alert:
            await self._flush_alert()
            raise
        await self._flush()
        logger.debug(
            "sent post-handshake client certificate server_name=%s key=%s",
            self._connection.config.server_name,
            event.identity.signer.uri,
        )

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Return up to `max_bytes` of application data.

        Raise `anyio.EndOfStream` after the server's close_notify, and
        `ConnectionLost` when the transport ends without one.
        """
        async with self._receive_lock:
            while True:
                # Decrypted records wait as events, so gather as many as fit
                # into one return before going back to the transport.
                if self._received_length >= max_bytes or (
                    self._received and self._close_notify_received
                ):
                    return self._take_received(max_bytes)
                if self._close_notify_received:
                    raise anyio.EndOfStream
                event = self._connection.next_event()
                if event is None:
                    if self._received:
                        return self._take_received(max_bytes)
                    await self._feed(await self._read_transport("mid-stream"))
                elif isinstance(event, SignatureRequested):
                    await self._respond_to_post_handshake_request(event)
                else:
                    self._take(event)

    def _take_received(self, max_bytes: int) -> bytes:
        """Remove and return up to `max_bytes` of the received chunks, in
        order. Only the chunks that fit are joined, and a chunk cut at
        `max_bytes` keeps its tail as the first chunk."""
        received = self._received
        if self._received_length <= max_bytes:
            data = b"".join(received)
            received.clear()
            self._received_length = 0
            return data
        whole_count, whole_length = self._count_whole_chunks(max_bytes)
        parts = received[:whole_count]
        cut = max_bytes - whole_length
        if cut:
            parts.append(received[whole_count][:cut])
            received[whole_count] = received[whole_count][cut:]
        del received[:whole_count]
        self._received_length -= max_bytes
        return b"".join(parts)

    def _count_whole_chunks(self, max_bytes: int) -> tuple[int, int]:
        """Return how many leading received chunks fit whole in
        `max_bytes`, and their total length."""
        count = length = 0
        for chunk in self._received:
            if length + len(chunk) > max_bytes:
                break
            count += 1
            length += len(chunk)
        return count, length

    async def send(self, item: bytes) -> None:
        """Send `item`, SEND_BATCH_BYTES at a time.

        The lock is released between batches so that a handshake flight
        queued meanwhile, such as the response to a post-handshake
        CertificateRequest, is not held back until a large write ends. A
        server that reads no further before it has our certificate would
        otherwise wait for us while we wait for it.
        """
        view = memoryview(item)
        for start in range(0, max(len(item), 1), SEND_BATCH_BYTES):
            # A relay step fits in one batch and goes in without a copy.
            batch = (
                item
                if len(item) <= SEND_BATCH_BYTES
                else bytes(view[start : start + SEND_BATCH_BYTES])
            )
            async with self._send_lock:
                try:
                    self._connection.send_application_data(batch)
                except TLSError as error:
                    raise anyio.ClosedResourceError(str(error)) from None
                await self._send_queued()

    async def send_eof(self) -> None:
        """Send close_notify; receiving continues (TLS 1.3 half-close)."""
        self._connection.send_close_notify()
        await self._flush()

    async def aclose(self) -> None:
        """Send close_notify if not yet sent (best effort), then close the
        transport."""
        try:
            with anyio.move_on_after(CLOSE_NOTIFY_TIMEOUT_SECONDS):
                with contextlib.suppress(
                    anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                ):
                    await self.send_eof()
        finally:
            await self.transport.aclose()
