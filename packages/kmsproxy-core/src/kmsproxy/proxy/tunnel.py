"""One tunnel: upstream TLS with the client certificate, mint, relay.

Step 1 connects to the CONNECT target over TCP. Step 2 runs the TLS 1.3
handshake with the current client identities and verifies the upstream,
then waits briefly for the server to reject our certificate. Any failure
so far gets a 502 response with the reason, and nothing is minted.
Step 3 mints (or reuses) a certificate for the upstream, step 4 sends 200
and completes the client's TLS with it, and step 5 relays bytes both ways
until both sides finish, one fails, or the tunnel sits idle.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from kmsproxy import tls
from kmsproxy.ca import LeafMinter
from kmsproxy.identity import Identity
from kmsproxy.proxy.connect import ConnectRequest, established_response, text_response
from kmsproxy.proxy.tls_stream import ServerTLSStream

logger = logging.getLogger(__name__)

# Bytes read per receive while relaying: one maximum TLS record's plaintext
# (RFC 8446 section 5.1), so each read maps to about one record.
RELAY_CHUNK_BYTES = 16384

# The protocol offered upstream and downstream. Offering h2 upstream would
# need the client's ALPN list, which arrives only after the 200 response.
# NOTE: so HTTP/2-only clients (gRPC) cannot use the tunnel yet.
ALPN_PROTOCOLS = ("http/1.1",)

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
# ...) arrives about one round trip later. The proxy waits twice the TCP
# connect time for it, within these bounds, before it sends 200.
# NOTE: this adds that wait to every new tunnel; the bounds are estimates.
REJECTION_WAIT_MIN_SECONDS = 0.02
REJECTION_WAIT_MAX_SECONDS = 0.5


class UpstreamError(Exception):
    """Reaching or authenticating to the upstream failed; `str()` is why."""


@dataclass
class Upstream:
    """An authenticated upstream and any bytes it sent during the wait."""

    stream: tls.TLSClientStream
    first_data: bytes = b""


@dataclass
class TunnelSettings:
    """Settings shared by every tunnel: the minter, trust and timeouts."""

    minter: LeafMinter
    trust: tls.TrustStore | None
    connect_timeout: float
    idle_timeout: float


async def run_tunnel(
    client: anyio.abc.ByteStream,
    request: ConnectRequest,
    identities: Sequence[Identity],
    settings: TunnelSettings,
) -> None:
    """Serve one CONNECT on `client` until the tunnel ends.

    `identities` is the snapshot this tunnel keeps even if the store reloads.
    """
    target = request.authority
    try:
        upstream = await open_upstream(request, identities, settings)
    except UpstreamError as error:
        logger.warning("Upstream failed target=%s reason=%s", target, error)
        await send_final(client, text_response(502, f"{target}: {error}"))
        return
    async with upstream.stream:
        await _serve_client(client, request, upstream, settings)


async def open_upstream(
    request: ConnectRequest,
    identities: Sequence[Identity],
    settings: TunnelSettings,
) -> Upstream:
    """Connect and authenticate to the target; raise `UpstreamError` on failure."""
    # Step 1: TCP.
    started = anyio.current_time()
    try:
        with anyio.fail_after(settings.connect_timeout):
            transport = await anyio.connect_tcp(request.host, request.port)
    except TimeoutError:
        raise UpstreamError(
            f"connection timed out after {settings.connect_timeout:g} s"
        ) from None
    except OSError as error:
        raise UpstreamError(describe_connect_error(error)) from None

    # Step 2: TLS 1.3 with our client certificate, then verification.
    config = tls.TLSClientConfig(
        server_name=request.host,
        identities=[tls.ClientIdentity(i.chain, i.signer) for i in identities],
        trust=settings.trust,
        alpn_protocols=ALPN_PROTOCOLS,
    )
    connect_seconds = anyio.current_time() - started
    try:
        stream = await tls.connect_tls(transport, config)
    except tls.CertificateVerifyFailed as error:
        reason = f"certificate verify failed: {error}"
    except tls.AlertReceived as error:
        reason = _describe_alert(error)
    except tls.HandshakeTimeout:
        reason = f"TLS handshake timed out after {config.handshake_timeout:g} s"
    except tls.TLSError as error:
        reason = f"TLS handshake failed: {error}"
    else:
        wait = min(
            max(2 * connect_seconds, REJECTION_WAIT_MIN_SECONDS),
            REJECTION_WAIT_MAX_SECONDS,
        )
        try:
            first_data = await _wait_for_rejection(stream, wait)
        except UpstreamError:
            await stream.aclose()
            raise
        return Upstream(stream, first_data)
    await transport.aclose()
    raise UpstreamError(reason)


def _describe_alert(error: tls.AlertReceived) -> str:
    if error.description in _CERTIFICATE_ALERTS:
        return f"server rejected our certificate: {error}"
    return f"TLS handshake failed: {error}"


async def _wait_for_rejection(stream: tls.TLSClientStream, wait: float) -> bytes:
    """Wait up to `wait` seconds for a post-handshake alert.

    Return the application data that arrived instead (a server that speaks
    first), or b"" when the server stayed silent.
    """
    try:
        with anyio.move_on_after(wait):
            return await stream.receive(RELAY_CHUNK_BYTES)
    except tls.AlertReceived as error:
        raise UpstreamError(_describe_alert(error)) from None
    except (tls.TLSError, anyio.EndOfStream) as error:
        raise UpstreamError(
            f"server closed the connection after the handshake ({error or 'EOF'})"
        ) from None
    return b""


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
    upstream_connection: Upstream,
    settings: TunnelSettings,
) -> None:
    target = request.authority
    upstream = upstream_connection.stream
    # Step 3: a certificate for the upstream, minted once per fingerprint.
    alpn = (upstream.alpn_protocol,) if upstream.alpn_protocol else ()
    context = await settings.minter.context_for_upstream(
        upstream.peer_chain[0], request.host, alpn
    )

    # Step 4: 200, then the client's own TLS handshake with that certificate.
    await client.send(established_response())
    try:
        downstream = await ServerTLSStream.wrap(
            client, context, initial_data=request.trailing_data
        )
    except (ssl.SSLError, anyio.EndOfStream, anyio.BrokenResourceError) as error:
        logger.info(
            "Client TLS handshake failed target=%s error=%s "
            "(does the client trust the kmsproxy CA?)",
            target,
            error,
        )
        return
    except TimeoutError:
        logger.info("Client TLS handshake timed out target=%s", target)
        return

    # Step 5: relay.
    logger.debug(
        "Tunnel open target=%s upstream=%s %s",
        target,
        upstream.version,
        upstream.cipher_suite,
    )
    try:
        if upstream_connection.first_data:
            await downstream.send(upstream_connection.first_data)
    except (ssl.SSLError, OSError, anyio.BrokenResourceError) as error:
        logger.debug("Client left before the tunnel opened error=%r", error)
        return
    sent, received = await relay(downstream, upstream, settings.idle_timeout, target)
    logger.debug(
        "Tunnel closed target=%s sent_bytes=%d received_bytes=%d",
        target,
        sent,
        received,
    )


async def relay(
    client: anyio.abc.ByteStream,
    upstream: anyio.abc.ByteStream,
    idle_timeout: float,
    target: str = "-",
) -> tuple[int, int]:
    """Copy bytes both ways; return (bytes to upstream, bytes to client).

    End of stream on one side becomes `send_eof` on the other, so a
    half-closed tunnel keeps flowing the other way. Any error, or
    `idle_timeout` seconds without a byte either way, ends both directions.
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
            await sink.send_eof()
        except Exception as error:
            # Any failure (reset, TLS alert, closed stream) ends the tunnel.
            logger.debug("Relay stopped target=%s error=%r", target, error)
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
