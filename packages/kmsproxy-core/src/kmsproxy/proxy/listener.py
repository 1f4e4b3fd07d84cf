"""Listen addresses, binding, and the plain-or-TLS sniff on each connection.

One port serves both `http://` and `https://` proxy URLs. A connection whose
first byte is 0x16 (a TLS handshake record, RFC 8446 section 5.1) is wrapped
in TLS with a certificate minted for the listen host. Anything else is read
as plain HTTP.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.stapled import MultiListener

from kmsproxy.errors import UserError
from kmsproxy.proxy.connect import HeadParser, RequestHead
from kmsproxy.proxy.tls_stream import ServerTLSStream

logger = logging.getLogger(__name__)

# The first byte of every TLS record carrying a handshake message
# (ContentType.handshake, RFC 8446 section 5.1).
TLS_HANDSHAKE_CONTENT_TYPE = 0x16

# Bytes read per receive while the request head arrives.
_HEAD_READ_BYTES = 4096

# Loopback addresses that `localhost` binds, each where the host has it.
_LOCALHOST_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class ListenAddress:
    """A host and port to listen on; `host` has no brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """Parse `host:port`, `tcp:host:port` (the Go tool's form) or `[v6]:port`.

    An empty host means `localhost`, not every interface, because anyone who
    reaches the port can use the client certificate.
    """
    value = text.removeprefix("tcp:") if text.startswith("tcp:") else text
    if value.isdigit():
        # A bare port. The host is required so that listening beyond this
        # machine is always written out.
        raise UserError(
            f"listen address {text!r}: missing host; use localhost:{value} "
            f"to listen on this machine only"
        )
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise UserError(f"listen address {text!r}: expected [v6-address]:port")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UserError(
                f"listen address {text!r}: {host!r} is not an IPv6 address"
            ) from None
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            raise UserError(f"listen address {text!r}: expected host:port")
        if ":" in host:
            raise UserError(
                f"listen address {text!r}: put an IPv6 address in brackets, "
                f"as [{host}]:{port_text}"
            )
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UserError(f"listen address {text!r}: port must be 0 to 65535")
    return ListenAddress(host or "localhost", int(port_text))


async def bind(
    address: ListenAddress, option: str = "--listen"
) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Bind `address`; `localhost` binds 127.0.0.1 and ::1 on one port.

    Port 0 picks a free port, shared by both loopback addresses. A failure
    raises `UserError` naming `option`, the setting the address came from.
    """
    if address.host.lower() != "localhost":
        try:
            return await anyio.create_tcp_listener(
                local_host=address.host, local_port=address.port
            )
        except OSError as error:
            raise UserError(_bind_failure(address, error, option)) from None
    listeners: list[anyio.abc.Listener[anyio.abc.SocketStream]] = []
    port = address.port
    for host in _LOCALHOST_ADDRESSES:
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as error:
            if listeners and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                logger.debug("Loopback address unavailable host=%s", host)
                continue
            for bound in listeners:
                await bound.aclose()
            failed = ListenAddress(host, port)
            raise UserError(_bind_failure(failed, error, option)) from None
        listeners.extend(listener.listeners)
        port = bound_addresses(listener)[0].port
    return MultiListener(listeners)


def _bind_failure(address: ListenAddress, error: OSError, option: str) -> str:
    """Return the one-line message for a failed bind, with what to do."""
    if error.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {address}: the port is already in use, perhaps "
            f"by another kmsproxy; stop that program or choose another port "
            f"with {option}"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {address}: no network interface of this machine "
            f"has that address; use one of its addresses or localhost in {option}"
        )
    if error.errno == errno.EACCES:
        return (
            f"cannot listen on {address}: permission denied (ports below 1024 "
            f"need privileges on most systems); choose a higher port with {option}"
        )
    return f"cannot listen on {address}: {error.strerror}; check {option}"


def bound_addresses(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
) -> list[ListenAddress]:
    """List the addresses a listener from `bind` is bound to."""
    sockets = getattr(listener, "listeners", [listener])
    addresses = []
    for sock in sockets:
        # anyio's typed attribute lookup (ruff mistakes it for Django's).
        raw: socket.socket = sock.extra(SocketAttribute.raw_socket)  # noqa: S610
        host, port = raw.getsockname()[:2]
        addresses.append(ListenAddress(host, port))
    return addresses


async def read_head(
    stream: anyio.abc.ByteStream, initial_data: bytes = b""
) -> RequestHead | None:
    """Read one request head; return None if the client closed first.

    Raise `RequestError` for a malformed or oversized head. The caller
    bounds the time with `HEAD_TIMEOUT_SECONDS`.
    """
    parser = HeadParser()
    head = parser.feed(initial_data)
    while head is None:
        try:
            data = await stream.receive(_HEAD_READ_BYTES)
        except anyio.EndOfStream:
            return None
        head = parser.feed(data)
    return head


async def receive_first(client: anyio.abc.ByteStream) -> bytes | None:
    """Receive the first bytes of a connection; None if the client closed."""
    try:
        return await client.receive(_HEAD_READ_BYTES)
    except anyio.EndOfStream:
        return None


def starts_tls_handshake(first: bytes) -> bool:
    """Tell whether a connection's first bytes start a TLS handshake record."""
    return first[0] == TLS_HANDSHAKE_CONTENT_TYPE


ContextFactory = Callable[[], Awaitable[ssl.SSLContext]]


async def sniff(
    client: anyio.abc.ByteStream, tls_context: ContextFactory
) -> tuple[anyio.abc.ByteStream, bytes] | None:
    """Read the first bytes and wrap the stream in TLS if they start a handshake.

    Return the stream to speak HTTP on and the bytes already read from it,
    or None when the client closed without sending anything.
    """
    first = await receive_first(client)
    if first is None:
        return None
    if not starts_tls_handshake(first):
        return client, first
    context = await tls_context()
    stream = await ServerTLSStream.wrap(client, context, initial_data=first)
    return stream, b""
