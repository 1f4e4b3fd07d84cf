"""Peek at the client's TLS ClientHello inside a tunnel, without consuming it.

After the 200 response the client starts TLS for the target. The proxy
needs two fields of that ClientHello before it opens the upstream: the
server_name (SNI, RFC 6066 section 3) and the ALPN list (RFC 7301 section
3.1). `read_client_hello` buffers the records, parses the record and
handshake headers strictly, and returns the raw bytes too, so the proxy's
own TLS server later reads the same ClientHello from the buffer.

The parser reads only what it needs and checks every length it crosses.
It does not validate cipher suites or other extensions, because the TLS
server (Python's `ssl`) checks them when it reads the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.abc

from kmsproxy.proxy.connect import normalize_host_name

# Maximum ClientHello size in bytes, across all its records. A browser's
# ClientHello with an X25519MLKEM768 key share (1,216 bytes) is about 2 KiB
# (an estimate), so 64 KiB leaves room for unusual clients while bounding
# what one tunnel buffers.
MAX_CLIENT_HELLO_BYTES = 64 * 1024

# Seconds the client has, after the 200 response, to send its whole
# ClientHello. Clients send it at once; the bound stops a silent client
# from holding the upstream connection.
CLIENT_HELLO_TIMEOUT_SECONDS = 10.0

# TLSPlaintext header: type (1), legacy_record_version (2), length (2).
RECORD_HEADER_BYTES = 5
# Maximum TLSPlaintext fragment length (RFC 8446 section 5.1).
MAX_RECORD_FRAGMENT_BYTES = 2**14
CONTENT_TYPE_HANDSHAKE = 0x16
HANDSHAKE_TYPE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
EXTENSION_ALPN = 16
SERVER_NAME_TYPE_HOST_NAME = 0

_READ_BYTES = 16384


class ClientHelloError(Exception):
    """The tunnel's first bytes are not a well-formed ClientHello.

    `is_tls` is false when the bytes do not start a TLS handshake record at
    all (the client speaks another protocol), so no TLS alert is sent.
    """

    def __init__(self, message: str, *, is_tls: bool = True) -> None:
        super().__init__(message)
        self.is_tls = is_tls


@dataclass(frozen=True)
class ClientHello:
    """The fields the proxy uses, and every byte read to learn them.

    `server_name` is the normalized SNI host name, or None when the client
    sent none. `raw` contains all bytes read from the client, which may run
    past the ClientHello.
    """

    server_name: str | None
    alpn_protocols: tuple[str, ...]
    raw: bytes


class _Reader:
    """A cursor over one message that raises `ClientHelloError` on overrun."""

    def __init__(self, data: bytes, message_name: str) -> None:
        self.data = data
        self.offset = 0
        self.message_name = message_name

    def take(self, length: int) -> bytes:
        end = self.offset + length
        if end > len(self.data):
            raise ClientHelloError(
                f"{self.message_name} is truncated at byte {self.offset}"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int, minimum: int = 0) -> _Reader:
        length = self.uint(length_size)
        if length < minimum:
            raise ClientHelloError(
                f"{self.message_name} has a vector of {length} bytes, below {minimum}"
            )
        return _Reader(self.take(length), self.message_name)

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset


def handshake_bytes(buffer: bytes) -> tuple[bytes, bool]:
    """Join the handshake fragments of the records in `buffer`.

    Return the joined fragments and whether the first handshake message is
    complete. Raise `ClientHelloError` for a non-handshake record, a wrong
    record version or an oversized record.
    """
    fragments = bytearray()
    offset = 0
    while offset + RECORD_HEADER_BYTES <= len(buffer):
        content_type = buffer[offset]
        if content_type != CONTENT_TYPE_HANDSHAKE:
            raise ClientHelloError(
                f"expected a TLS handshake record (type 22), got type {content_type}",
                is_tls=offset > 0,
            )
        # Step 1: the record header (RFC 8446 section 5.1). legacy_record_version
        # is 0x0301 or 0x0303 in practice; any 0x03xx is accepted here.
        if buffer[offset + 1] != 0x03:
            raise ClientHelloError(
                f"record version 0x{buffer[offset + 1]:02x}"
                f"{buffer[offset + 2]:02x} is not TLS",
                is_tls=offset > 0,
            )
        length = int.from_bytes(buffer[offset + 3 : offset + 5], "big")
        if length == 0 or length > MAX_RECORD_FRAGMENT_BYTES:
            raise ClientHelloError(
                f"handshake record length {length} is outside 1 to "
                f"{MAX_RECORD_FRAGMENT_BYTES}"
            )
        start = offset + RECORD_HEADER_BYTES
        if start + length > len(buffer):
            break
        fragments += buffer[start : start + length]
        offset = start + length
        # Step 2: the handshake header: msg_type (1) and length (3).
        if len(fragments) >= 4:
            message_length = int.from_bytes(fragments[1:4], "big")
            if len(fragments) >= 4 + message_length:
                return bytes(fragments), True
    if offset == 0 and buffer[:1] and buffer[0] != CONTENT_TYPE_HANDSHAKE:
        raise ClientHelloError(
            f"expected a TLS handshake record (type 22), got type {buffer[0]}",
            is_tls=False,
        )
    return bytes(fragments), False


def parse_client_hello(buffer: bytes) -> ClientHello | None:
    """Parse the ClientHello at the start of `buffer`; None if incomplete.

    Raise `ClientHelloError` when the bytes cannot be a ClientHello or it is
    larger than `MAX_CLIENT_HELLO_BYTES`.
    """
    handshake, complete = handshake_bytes(buffer)
    if len(handshake) >= 4:
        if handshake[0] != HANDSHAKE_TYPE_CLIENT_HELLO:
            raise ClientHelloError(
                f"expected a ClientHello (handshake type 1), got type {handshake[0]}"
            )
        message_length = int.from_bytes(handshake[1:4], "big")
        if message_length > MAX_CLIENT_HELLO_BYTES:
            raise ClientHelloError(
                f"ClientHello of {message_length} bytes is larger than "
                f"{MAX_CLIENT_HELLO_BYTES}"
            )
    if not complete:
        if len(buffer) > MAX_CLIENT_HELLO_BYTES + RECORD_HEADER_BYTES * 8:
            raise ClientHelloError(
                f"no complete ClientHello in the first {len(buffer)} bytes"
            )
        return None
    message_length = int.from_bytes(handshake[1:4], "big")
    body = _Reader(handshake[4 : 4 + message_length], "ClientHello")
    server_name, alpn = _parse_body(body)
    return ClientHello(server_name, alpn, buffer)


def _parse_body(body: _Reader) -> tuple[str | None, tuple[str, ...]]:
    # RFC 8446 section 4.1.2: legacy_version, random, legacy_session_id,
    # cipher_suites, legacy_compression_methods, extensions.
    body.take(2 + 32)
    body.vector(1)
    body.vector(2, minimum=2)
    body.vector(1, minimum=1)
    if body.remaining == 0:
        # A ClientHello without extensions (RFC 5246 section 7.4.1.2).
        return None, ()
    extensions = body.vector(2)
    if body.remaining:
        raise ClientHelloError(
            f"ClientHello has {body.remaining} bytes after its extensions"
        )
    seen: set[int] = set()
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    while extensions.remaining:
        extension_type = extensions.uint(2)
        data = extensions.vector(2)
        if extension_type in seen:
            # RFC 8446 section 4.2: at most one extension of each type.
            raise ClientHelloError(f"ClientHello repeats extension {extension_type}")
        seen.add(extension_type)
        if extension_type == EXTENSION_SERVER_NAME:
            server_name = _parse_server_name(data)
        elif extension_type == EXTENSION_ALPN:
            alpn = _parse_alpn(data)
    return server_name, alpn


def _parse_server_name(data: _Reader) -> str | None:
    # RFC 6066 section 3: ServerNameList<1..2^16-1>, one host_name at most.
    names = data.vector(2, minimum=1)
    _expect_end(data, "server_name")
    host_name: str | None = None
    while names.remaining:
        name_type = names.uint(1)
        name = names.vector(2, minimum=1).data
        if name_type != SERVER_NAME_TYPE_HOST_NAME:
            continue
        if host_name is not None:
            raise ClientHelloError("server_name lists more than one host_name")
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            raise ClientHelloError(
                f"server_name {name[:64]!r} is not ASCII (IDNs must be A-labels)"
            ) from None
        normalized = normalize_host_name(text)
        if normalized is None:
            raise ClientHelloError(f"server_name {text[:64]!r} is not a DNS name")
        host_name = normalized
    return host_name


def _parse_alpn(data: _Reader) -> tuple[str, ...]:
    # RFC 7301 section 3.1: ProtocolNameList<2..2^16-1> of ProtocolName<1..2^8-1>.
    names = data.vector(2, minimum=2)
    _expect_end(data, "application_layer_protocol_negotiation")
    protocols: list[str] = []
    while names.remaining:
        name = names.vector(1, minimum=1).data
        if not name.isascii():
            # Python's ssl takes ALPN protocols as ASCII strings; every
            # registered protocol ID is ASCII.
            continue
        protocols.append(name.decode("ascii"))
    return tuple(protocols)


def _expect_end(data: _Reader, extension: str) -> None:
    if data.remaining:
        raise ClientHelloError(
            f"{extension} extension has {data.remaining} bytes after its list"
        )


async def read_client_hello(
    stream: anyio.abc.ByteStream, initial_data: bytes = b""
) -> ClientHello:
    """Read from `stream` until a whole ClientHello has arrived, and parse it.

    Raise `ClientHelloError` for bytes that are not a ClientHello and
    `anyio.EndOfStream` when the client closes first. The caller bounds the
    time with `CLIENT_HELLO_TIMEOUT_SECONDS`.
    """
    buffer = bytearray(initial_data)
    while True:
        if buffer:
            hello = parse_client_hello(bytes(buffer))
            if hello is not None:
                return hello
        buffer += await stream.receive(_READ_BYTES)
