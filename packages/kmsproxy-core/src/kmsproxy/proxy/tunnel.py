"""One tunnel: upstream TLS with the client certificate, mint, relay.

Step 1 connects to the CONNECT target over TCP; a failure gets a 502
response to the CONNECT itself, so curl names it in its error message.
Step 2 sends 200 and reads the client's ClientHello without consuming it,
to learn its SNI and ALPN offers. Step 3 runs the upstream TLS handshake
with that SNI (the CONNECT host when absent), that ALPN list and the
current client identities, and verifies the upstream. After a full TLS 1.3
handshake in which the server requested a certificate, it then waits for
the server's first ticket or data, or briefly for its rejection. Step 4
mints (or reuses) a certificate for the upstream and completes the
client's handshake, selecting the protocol the upstream selected. Step 5
relays bytes both ways until both sides finish, one fails, or the tunnel
sits idle.

When step 3 fails, the client gets the reason in the protocol it can read
(see `serve_upstream_failure`), and nothing is minted for the upstream. A
rejection that arrives after the wait comes during step 5, after the mint
(see `_RejectionGuard`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from cryptography.hazmat.primitives import hashes

from kmsproxy import tls
from kmsproxy.ca import CA_SIGN_TIMEOUT_SECONDS, LeafMinter, MintError
from kmsproxy.identity import Identity
from kmsproxy.proxy.client_hello import (
    CLIENT_HELLO_TIMEOUT_SECONDS,
    ClientHello,
    ClientHelloError,
    read_client_hello,
)
from kmsproxy.proxy.connect import (
    ConnectRequest,
    established_response,
    printable,
    text_response,
)
from kmsproxy.proxy.error_leaf import ErrorLeafMinter
from kmsproxy.proxy.tls_stream import ServerTLSStream
from kmsproxy.proxy.upstream_address import AddressCache, connect_tcp
from kmsproxy.signer import SignerError

logger = logging.getLogger(__name__)

# Bytes read per receive while relaying: up to 16 maximum-size TLS records
# (2^14 bytes each, RFC 8446 section 5.1). Each receive and send has a
# fixed cost (system calls and turns of the event loop) besides the copy,
# so a bulk transfer moves many records per step. tls/stream.py and
# proxy/tls_stream.py read their transports in steps of the same size.
RELAY_CHUNK_BYTES = 16 * 16384

# The ALPN protocol ID of HTTP/1.1 (RFC 7301 section 6).
HTTP_1_1 = "http/1.1"

# Seconds to keep reading (and discarding) after an error response before
# closing, so the client reads the response instead of a TCP reset caused by
# its unread bytes. nginx's lingering_timeout default is 5 s; a rejected
# proxy client needs far less.
LINGER_SECONDS = 2.0

# Maximum bytes discarded while lingering.
LINGER_MAX_BYTES = 64 * 1024

# Server alerts that mean the upstream rejected our client certificate
# (RFC 8446 section 6.2).
_CERTIFICATE_ALERTS = frozenset(
    {
        tls.AlertDescription.bad_certificate,
        tls.AlertDescription.unsupported_certificate,
        tls.AlertDescription.certificate_revoked,
        tls.AlertDescription.certificate_expired,
        tls.AlertDescription.certificate_unknown,
        tls.AlertDescription.unknown_ca,
        tls.AlertDescription.access_denied,
        tls.AlertDescription.certificate_required,
    }
)


# In TLS 1.3 the client finishes its handshake before the server has checked
# the client certificate, so a rejection (certificate_required, unknown_ca,
# ...) arrives about one round trip later. After a full handshake in which
# the server requested a certificate, the proxy waits for the first thing
# the server sends. A NewSessionTicket or data ends the wait at once (see
# `TLSClientStream.client_certificate_pending`), and an alert is the
# rejection. A server that sends nothing is waited for twice the TCP
# connect time, within these bounds. A rejection that comes later still
# reaches an HTTP/1.1 client as a 502 (see `_RejectionGuard`).
# NOTE: the bounds are estimates, not measurements of slow servers.
REJECTION_WAIT_MIN_SECONDS = 0.005
REJECTION_WAIT_MAX_SECONDS = 0.5

# Maximum seconds for minting one leaf, including the wait for another
# tunnel minting for the same upstream. It is a little longer than
# ca.CA_SIGN_TIMEOUT_SECONDS, so the CA's own message about a slow device
# comes first. A hung CA Signer thus costs each CONNECT at most this long:
# after such a failure no error-page leaf is minted with the same key.
# NOTE: a Signer that blocks the event loop (no await) cannot be bounded.
MINT_TIMEOUT_SECONDS = CA_SIGN_TIMEOUT_SECONDS + 5.0

_CLIENT_ERRORS = (
    ssl.SSLError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


class UpstreamError(Exception):
    """Reaching or authenticating to the upstream failed; `str()` is why.

    `alert` is the TLS alert that ended the upstream handshake (received or
    sent), or handshake_failure when none did; an h2-only client gets it.
    """

    def __init__(
        self, reason: str, alert: int = tls.AlertDescription.handshake_failure
    ) -> None:
        super().__init__(reason)
        self.alert = alert


@dataclass
class Upstream:
    """An authenticated upstream and any bytes it sent during the wait."""

    stream: tls.TLSClientStream
    first_data: bytes = b""


@dataclass
class TunnelCounters:
    """Tunnel counts since start: open now, opened in total, and failed."""

    open: int = 0
    total: int = 0
    failed: int = 0


@dataclass
class TunnelSettings:
    """Settings shared by every tunnel: minters, trust, timeouts, counters."""

    minter: LeafMinter
    trust: tls.TrustStore | None
    connect_timeout: float
    idle_timeout: float
    error_minter: ErrorLeafMinter | None = None
    session_cache: tls.SessionCache | None = None
    counters: TunnelCounters = field(default_factory=TunnelCounters)
    # The address each upstream host name last connected on.
    addresses: AddressCache = field(default_factory=AddressCache)
    # The proxy's own listening (IP address, port) pairs, set once bound. A
    # CONNECT that reaches one of them is rejected as a loop.
    own_addresses: frozenset[tuple[str, int]] = frozenset()


async def run_tunnel(
    client: anyio.abc.ByteStream,
    request: ConnectRequest,
    identities: Sequence[Identity],
    settings: TunnelSettings,
) -> None:
    """Serve one CONNECT on `client` until the tunnel ends.

    `identities` is the snapshot this tunnel keeps even if the store reloads.
    """
    counters = settings.counters
    counters.total += 1
    counters.open += 1
    try:
        if not await _run_tunnel(client, request, identities, settings):
            counters.failed += 1
    finally:
        counters.open -= 1


async def _run_tunnel(
    client: anyio.abc.ByteStream,
    request: ConnectRequest,
    identities: Sequence[Identity],
    settings: TunnelSettings,
) -> bool:
    """Serve the tunnel; return False when it failed before the relay."""
    target = request.authority
    # Step 1: TCP, answered with 502 on the CONNECT itself when it fails.
    started = anyio.current_time()
    try:
        transport = await connect_upstream(
            request, settings.connect_timeout, settings.addresses
        )
    except UpstreamError as error:
        logger.warning("Upstream failed target=%s reason=%s", target, printable(error))
        await send_final_and_linger(client, text_response(502, f"{target}: {error}"))
        return False
    connect_seconds = anyio.current_time() - started

    async with transport:
        if is_own_address(transport, settings.own_addresses):
            logger.warning("Loop rejected target=%s", target)
            message = (
                f"{target} is this proxy's own listening address, and a tunnel "
                "to it would loop back into the proxy"
            )
            await send_final_and_linger(client, text_response(508, message))
            return False

        # Step 2: 200, then the client's ClientHello, kept for the handshake.
        try:
            await client.send(established_response())
            with anyio.fail_after(CLIENT_HELLO_TIMEOUT_SECONDS):
                hello = await read_client_hello(client, request.trailing_data)
        except ClientHelloError as error:
            logger.warning(
                "Client did not start TLS in the tunnel target=%s error=%s",
                target,
                error,
            )
            if error.is_tls:
                await send_final(
                    client, alert_record(tls.AlertDescription.decode_error)
                )
            return False
        except TimeoutError:
            logger.info("Client sent no ClientHello in time target=%s", target)
            return False
        except _CLIENT_ERRORS as error:
            logger.debug("Client left before its ClientHello error=%r", error)
            return False

        # Step 3: upstream TLS with the client's SNI and ALPN offers.
        server_name = hello.server_name or request.host
        try:
            upstream = await open_upstream(
                transport,
                request,
                server_name,
                hello.alpn_protocols,
                identities,
                settings,
                connect_seconds,
            )
        except UpstreamError as error:
            logger.warning(
                "Upstream failed target=%s reason=%s", target, printable(error)
            )
            await serve_upstream_failure(client, request, hello, error, settings)
            return False
        async with upstream.stream:
            return await _serve_client(client, request, hello, upstream, settings)


async def connect_upstream(
    request: ConnectRequest,
    connect_timeout: float,
    addresses: AddressCache | None = None,
) -> anyio.abc.SocketStream:
    """Open TCP to the target; raise `UpstreamError` on failure.

    With `addresses`, a host name connects first to the address it last
    connected on (see upstream_address.py).
    """
    try:
        with anyio.fail_after(connect_timeout):
            return await connect_tcp(request.host, request.port, addresses)
    except TimeoutError:
        raise UpstreamError(
            f"connection timed out after {connect_timeout:g} s"
        ) from None
    except OSError as error:
        raise UpstreamError(describe_connect_error(error)) from None


async def open_upstream(
    transport: anyio.abc.ByteStream,
    request: ConnectRequest,
    server_name: str,
    alpn_protocols: Sequence[str],
    identities: Sequence[Identity],
    settings: TunnelSettings,
    connect_seconds: float = 0.0,
) -> Upstream:
    """Authenticate to the upstream over `transport`; raise `UpstreamError`.

    The caller closes `transport` when this raises. With a session cache,
    the ticket key is (host, port, SNI, client leaf fingerprints), so a
    ticket never resumes for another upstream or another identity set.
    """
    fingerprints = tuple(i.leaf.fingerprint(hashes.SHA256()) for i in identities)
    config = tls.TLSClientConfig(
        server_name=server_name,
        identities=[tls.ClientIdentity(i.chain, i.signer) for i in identities],
        trust=settings.trust,
        alpn_protocols=alpn_protocols,
        session_cache=settings.session_cache,
        session_key=(request.host, request.port, server_name, fingerprints),
    )
    try:
        stream = await tls.connect_tls(transport, config)
    except tls.CertificateVerifyFailed as error:
        raise UpstreamError(
            f"certificate verify failed: {error}", error.description
        ) from None
    except tls.AlertReceived as error:
        raise UpstreamError(_describe_alert(error), error.description) from None
    except tls.HandshakeTimeout:
        raise UpstreamError(
            f"TLS handshake timed out after {config.handshake_timeout:g} s"
        ) from None
    except tls.Alert as error:
        raise UpstreamError(
            f"TLS handshake failed: {error}", error.description
        ) from None
    except tls.TLSError as error:
        raise UpstreamError(f"TLS handshake failed: {error}") from None
    except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as error:
        raise UpstreamError(
            f"connection lost during the TLS handshake: {error!r}"
        ) from None
    except Exception as error:
        # A client key's Signer comes from a plugin and may raise anything.
        # The client still gets a 502 naming the error instead of nothing.
        raise UpstreamError(
            f"TLS handshake failed: {type(error).__name__}: {error}"
        ) from error
    if not stream.client_certificate_pending:
        # TLS 1.2 (the server's Finished came after our certificate), a
        # resumed handshake (no certificate, RFC 8446 section 4.3.2), a
        # server that requested none, or one that already sent a ticket:
        # there is nothing left for the server to reject.
        return Upstream(stream)
    wait = min(
        max(2 * connect_seconds, REJECTION_WAIT_MIN_SECONDS),
        REJECTION_WAIT_MAX_SECONDS,
    )
    try:
        first_data = await _wait_for_rejection(stream, wait)
    except UpstreamError:
        await stream.aclose()
        raise
    if first_data:
        outcome = "data"
    elif stream.client_certificate_pending:
        outcome = "timeout"
    else:
        outcome = "ticket"
    logger.debug(
        "Rejection wait ended target=%s outcome=%s wait_seconds=%.3f",
        request.authority,
        outcome,
        wait,
    )
    return Upstream(stream, first_data)


def _describe_alert(error: tls.AlertReceived) -> str:
    if error.description in _CERTIFICATE_ALERTS:
        return f"server rejected our certificate: {error}"
    return f"TLS handshake failed: {error}"


async def _wait_for_rejection(stream: tls.TLSClientStream, wait: float) -> bytes:
    """Wait up to `wait` seconds for a post-handshake alert.

    Return the application data that arrived instead (a server that speaks
    first), or b"" when the server sent a ticket or stayed silent.
    """
    try:
        with anyio.move_on_after(wait):
            return await stream.receive_after_handshake(RELAY_CHUNK_BYTES)
    except tls.AlertReceived as error:
        raise UpstreamError(_describe_alert(error), error.description) from None
    except anyio.EndOfStream:
        raise UpstreamError(
            "server closed the connection after the handshake (close_notify)"
        ) from None
    except tls.ConnectionLost as error:
        raise UpstreamError(str(error)) from None
    except tls.Alert as error:
        raise UpstreamError(
            f"TLS failed after the handshake: {error}", error.description
        ) from None
    except tls.TLSError as error:
        raise UpstreamError(f"TLS failed after the handshake: {error}") from None
    return b""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _unmapped_address(host: str) -> IPAddress | None:
    """Parse `host`, turning an IPv4-mapped IPv6 address into its IPv4 address.

    A dual-stack IPv6 socket reaches an IPv4 listener through
    `::ffff:a.b.c.d`, so the two forms name the same socket. Return None for
    text that is not an IP address.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_own_address(
    transport: anyio.abc.SocketStream, own_addresses: frozenset[tuple[str, int]]
) -> bool:
    """Tell whether `transport` is connected to one of `own_addresses`.

    Addresses are compared as IP addresses, with IPv4-mapped IPv6 addresses
    taken as their IPv4 address on both sides. A listener on 0.0.0.0 or ::
    also matches any connection whose remote address equals its local
    address, which is a connection to this host.
    """
    remote = transport.extra(SocketAttribute.remote_address)  # noqa: S610
    local = transport.extra(SocketAttribute.local_address)  # noqa: S610
    if not isinstance(remote, tuple) or not isinstance(local, tuple):
        return False
    remote_address = _unmapped_address(str(remote[0]))
    remote_port = int(remote[1])
    if remote_address is None:
        return False
    to_this_host = remote_address == _unmapped_address(str(local[0]))
    for host, port in own_addresses:
        own_address = _unmapped_address(host)
        if port != remote_port or own_address is None:
            continue
        if own_address == remote_address:
            return True
        if to_this_host and own_address.is_unspecified:
            return True
    return False


def describe_connect_error(error: OSError) -> str:
    """Name the cause of a failed TCP connect in a few words.

    anyio tries every resolved address and raises a generic OSError whose
    cause is the single failure or an ExceptionGroup of all of them.
    """
    causes: list[BaseException] = [error]
    cause = error.__cause__
    if isinstance(cause, BaseExceptionGroup):
        causes = list(cause.exceptions)
    elif cause is not None:
        causes = [cause]
    if all(isinstance(c, ConnectionRefusedError) for c in causes):
        return "connection refused"
    if any(isinstance(c, socket.gaierror) for c in causes):
        return f"cannot resolve host name: {error.strerror or error}"
    first = causes[0]
    detail = first.strerror if isinstance(first, OSError) else None
    return f"connection failed: {detail or first}"


async def _serve_client(
    client: anyio.abc.ByteStream,
    request: ConnectRequest,
    hello: ClientHello,
    upstream_connection: Upstream,
    settings: TunnelSettings,
) -> bool:
    target = request.authority
    upstream = upstream_connection.stream
    # Step 4: a certificate for the upstream, minted once per fingerprint,
    # offering only the protocol the upstream selected (or none).
    alpn = (upstream.alpn_protocol,) if upstream.alpn_protocol else ()
    server_name = hello.server_name or request.host
    minter = settings.minter
    try:
        # A cached leaf needs neither the CA key nor the timeout.
        context = minter.cached_context_for_upstream(
            upstream.peer_chain[0], server_name, alpn
        )
        if context is None:
            with anyio.fail_after(MINT_TIMEOUT_SECONDS):
                context = await minter.context_for_upstream(
                    upstream.peer_chain[0], server_name, alpn
                )
    except Exception as error:
        # The minter raises MintError for names it cannot encode and for a
        # failed CA Signer. Any other exception comes from a plugin's Signer
        # or a bug. Neither may escape as a traceback that leaves the client
        # without an answer.
        reason = describe_mint_error(error, MINT_TIMEOUT_SECONDS)
        logger.warning("Minting failed target=%s reason=%s", target, printable(reason))
        failure = UpstreamError(
            f"minting a certificate for {server_name!r} failed: {reason}",
            tls.AlertDescription.internal_error,
        )
        if ca_key_failed(error):
            # The error-page leaf needs the same CA key, which would fail or
            # hang again and double the wait, so send the alert at once.
            await send_final(client, alert_record(failure.alert))
        else:
            await serve_upstream_failure(client, request, hello, failure, settings)
        return False
    downstream = await _accept_client_tls(client, context, hello, target)
    if downstream is None:
        return False

    # Step 5: relay.
    logger.debug(
        "Tunnel open target=%s upstream=%s %s alpn=%s",
        target,
        upstream.version,
        upstream.cipher_suite,
        upstream.alpn_protocol or "-",
    )
    try:
        if upstream_connection.first_data:
            await downstream.send(upstream_connection.first_data)
    except (ssl.SSLError, OSError, anyio.BrokenResourceError) as error:
        logger.debug("Client left before the tunnel opened error=%r", error)
        return True
    relayed: anyio.abc.ByteStream = upstream
    if upstream.client_certificate_pending:
        page = upstream.alpn_protocol in (None, HTTP_1_1)
        relayed = _RejectionGuard(upstream, target, page)
    sent, received = await relay(downstream, relayed, settings.idle_timeout, target)
    if isinstance(relayed, _RejectionGuard) and relayed.rejected:
        return False
    logger.debug(
        "Tunnel closed target=%s sent_bytes=%d received_bytes=%d",
        target,
        sent,
        received,
    )
    return True


class _RejectionGuard(anyio.abc.ByteStream):
    """The upstream of a tunnel whose server stayed silent through the wait.

    When the server sends an alert before anything else, an HTTP/1.1
    client (`page`) reads a 502 response naming it in place of the
    upstream's response, the same one an alert within the wait gets. A
    tunnel without ALPN counts as HTTP/1.1 here, as in
    `serve_upstream_failure`. Other protocols get a closed tunnel, and
    relay() logs the alert. For `LINGER_SECONDS` after the alert, what the
    client still sends (the rest of a request body) is discarded, so the
    page is not cut off, and then the tunnel ends.
    """

    def __init__(self, stream: tls.TLSClientStream, target: str, page: bool) -> None:
        self._stream = stream
        self._target = target
        self._page = page
        self._page_sent = False
        self._confirmed = False
        self.rejected = False
        self._rejected_at = 0.0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._page_sent:
            raise anyio.EndOfStream
        if self._confirmed or not self._stream.client_certificate_pending:
            self._confirmed = True
            return await self._stream.receive(max_bytes)
        try:
            return await self._stream.receive(max_bytes)
        except tls.AlertReceived as error:
            self.rejected = True
            self._rejected_at = anyio.current_time()
            if not self._page:
                # relay() logs the alert.
                raise
            reason = _describe_alert(error)
            logger.warning(
                "Upstream failed target=%s reason=%s", self._target, printable(reason)
            )
            self._page_sent = True
            return text_response(502, f"{self._target}: {reason}")

    async def send(self, item: bytes) -> None:
        if self.rejected:
            if anyio.current_time() - self._rejected_at > LINGER_SECONDS:
                raise anyio.BrokenResourceError
            return
        await self._stream.send(item)

    async def send_eof(self) -> None:
        if self.rejected:
            return
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _accept_client_tls(
    client: anyio.abc.ByteStream,
    context: ssl.SSLContext,
    hello: ClientHello,
    target: str,
) -> ServerTLSStream | None:
    """Complete the client's handshake from its buffered ClientHello."""
    try:
        return await ServerTLSStream.wrap(client, context, initial_data=hello.raw)
    except _CLIENT_ERRORS as error:
        logger.info(
            "Client TLS handshake failed target=%s error=%s "
            "(does the client trust the kmsproxy CA?)",
            target,
            error,
        )
    except TimeoutError:
        logger.info("Client TLS handshake timed out target=%s", target)
    return None


async def serve_upstream_failure(
    client: anyio.abc.ByteStream,
    request: ConnectRequest,
    hello: ClientHello,
    error: UpstreamError,
    settings: TunnelSettings,
) -> None:
    """Tell a client whose tunnel already got 200 why its upstream failed.

    A client that offered HTTP/1.1 (or no ALPN at all) completes its
    handshake with an error-page leaf for the CONNECT host and reads a 502
    response stating the reason, selecting http/1.1 even when it offered h2
    first. Any other client (h2-only, such as gRPC) gets the TLS alert that
    ended the upstream handshake in place of a ServerHello, because its
    HTTP/2 stack would report a GOAWAY less clearly than its TLS library
    reports an alert.
    """
    offers = hello.alpn_protocols
    if (offers and HTTP_1_1 not in offers) or settings.error_minter is None:
        await send_final(client, alert_record(error.alert))
        return
    try:
        with anyio.fail_after(MINT_TIMEOUT_SECONDS):
            context = await settings.error_minter.context_for(
                request.host, (HTTP_1_1,) if offers else ()
            )
    except Exception as error_page_error:
        # Any failure here falls back to the alert; see _serve_client.
        logger.warning(
            "Minting the error-page certificate failed target=%s reason=%s",
            request.authority,
            printable(describe_mint_error(error_page_error, MINT_TIMEOUT_SECONDS)),
        )
        await send_final(client, alert_record(error.alert))
        return
    downstream = await _accept_client_tls(client, context, hello, request.authority)
    if downstream is None:
        return
    response = text_response(502, f"{request.authority}: {error}")
    try:
        await send_final_and_linger(downstream, response)
    finally:
        with contextlib.suppress(*_CLIENT_ERRORS):
            await downstream.aclose()


def ca_key_failed(error: Exception) -> bool:
    """Tell whether a mint failed in the CA key rather than in the request.

    Only a `MintError` about the leaf itself (a name it cannot encode, or a
    name cryptography rejected) leaves the CA key usable. A timeout, a
    `SignerError`, a `MintError` caused by either, and any other exception
    from a plugin's Signer count as a failed CA key.
    """
    if not isinstance(error, MintError):
        return True
    return isinstance(error.__cause__, SignerError | TimeoutError)


def describe_mint_error(error: Exception, timeout: float) -> str:
    """Name why minting failed, with the exception type when it is unexpected."""
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(error, MintError | SignerError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def alert_record(description: int) -> bytes:
    """Build a plaintext fatal alert record, valid before any ServerHello.

    RFC 8446 section 6: AlertLevel fatal (2) and the description, in a
    record of type alert (21) with legacy_record_version 0x0303.
    """
    return bytes((21, 3, 3, 0, 2, 2, description))


async def relay(
    client: anyio.abc.ByteStream,
    upstream: anyio.abc.ByteStream,
    idle_timeout: float,
    target: str = "-",
) -> tuple[int, int]:
    """Copy bytes both ways; return (bytes to upstream, bytes to client).

    End of stream on one side becomes `send_eof` on the other, so a
    half-closed tunnel keeps flowing the other way. Any error, or
    `idle_timeout` seconds without a completed receive or send in either
    direction, ends both directions.
    Each send is awaited before the next receive, so a slow reader slows
    the writer instead of filling memory.
    """
    counts = [0, 0]
    last_activity = anyio.current_time()
    finished = 0

    async def pump(
        source: anyio.abc.ByteStream,
        sink: anyio.abc.ByteStream,
        index: int,
        group: anyio.abc.TaskGroup,
    ) -> None:
        nonlocal last_activity, finished
        try:
            while True:
                try:
                    data = await source.receive(RELAY_CHUNK_BYTES)
                except anyio.EndOfStream:
                    break
                last_activity = anyio.current_time()
                counts[index] += len(data)
                await sink.send(data)
                # A send that a slow reader held up is activity too, as in
                # nginx's proxy_timeout (between two reads or writes).
                last_activity = anyio.current_time()
            await sink.send_eof()
        except Exception as error:
            # Any failure (reset, TLS alert, closed stream) ends the tunnel.
            # Most are a normal teardown: a server that closes without
            # close_notify after the client left, for one. A fatal alert
            # from the upstream is not, and may be a late rejection of our
            # certificate that the client sees only as a closed connection.
            if isinstance(error, tls.AlertReceived):
                logger.warning(
                    "Upstream failed target=%s reason=%s",
                    target,
                    printable(_describe_alert(error)),
                )
            else:
                logger.debug("Relay stopped target=%s cause=%r", target, error)
            group.cancel_scope.cancel()
            return
        finished += 1
        if finished == 2:
            group.cancel_scope.cancel()

    async def watch_idle(group: anyio.abc.TaskGroup) -> None:
        while True:
            remaining = last_activity + idle_timeout - anyio.current_time()
            if remaining <= 0:
                logger.info(
                    "Tunnel idle, closing target=%s idle_seconds=%g",
                    target,
                    idle_timeout,
                )
                group.cancel_scope.cancel()
                return
            await anyio.sleep(remaining)

    async with anyio.create_task_group() as group:
        group.start_soon(pump, client, upstream, 0, group)
        group.start_soon(pump, upstream, client, 1, group)
        group.start_soon(watch_idle, group)
    return counts[0], counts[1]


async def send_final(stream: anyio.abc.ByteStream, data: bytes) -> None:
    """Send a final response; a client that already left is not an error."""
    with contextlib.suppress(
        anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
    ):
        await stream.send(data)


async def send_final_and_linger(stream: anyio.abc.ByteStream, response: bytes) -> None:
    """Send a final response, half-close, and drain briefly before closing."""
    await send_final(stream, response)
    with anyio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_eof()
            discarded = 0
            while discarded < LINGER_MAX_BYTES:
                discarded += len(await stream.receive())
        except (*_CLIENT_ERRORS, NotImplementedError):
            pass
