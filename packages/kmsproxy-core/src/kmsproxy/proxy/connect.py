"""The CONNECT request head and the proxy's responses, without I/O.

`HeadParser` consumes bytes as they arrive and returns a `RequestHead` once
the head is complete; `parse_connect` turns it into a `ConnectRequest`. Both
raise `RequestError` carrying the response status code. Only the
authority-form CONNECT of RFC 9110 section 9.3.6 is served. Every other
request gets an error response, and the connection is closed. The
`*_response` functions build the bytes sent back. The caller owns the
socket, the timeouts and the logging.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

# Maximum size of a request head in bytes, request line and headers included.
# 16 KiB is h11's default limit; Apache's LimitRequestFieldSize allows 8190
# bytes per header line. A CONNECT head is usually under 200 bytes.
MAX_HEAD_BYTES = 16 * 1024

# Seconds a client may take to send the whole head before it gets 408.
# Apache's mod_reqtimeout default allows 20 seconds for the first header byte.
HEAD_TIMEOUT_SECONDS = 20.0

SUPPORTED_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
# A header field value: visible characters, spaces and tabs (RFC 9110 5.5).
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# A DNS name in a CONNECT target: LDH labels plus "_", which some internal
# zones use. IDNs arrive as A-labels ("xn--..."), so ASCII is enough.
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_MAX_DNS_NAME = 253
# A label that the WHATWG URL standard's IPv4 parser reads as a number:
# decimal, or hex with a 0x prefix.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_REASONS = {
    200: "Connection established",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    505: "HTTP Version Not Supported",
    508: "Loop Detected",
}


class RequestError(Exception):
    """A request the proxy rejects; `status_code` is the response status.

    `str()` is the one-line explanation sent as the response body.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.headers = headers


@dataclass(frozen=True)
class RequestHead:
    """A syntactically valid request head of any method.

    `trailing_data` contains bytes the client sent after the head (often its
    ClientHello), which belong to whatever follows the head.
    """

    method: str
    target: str
    http_version: str
    headers: tuple[tuple[str, str], ...] = ()
    trailing_data: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class ConnectRequest:
    """A parsed `CONNECT host:port` request.

    `host` is a lower-case DNS name or an IP literal without brackets;
    `trailing_data` belongs to the tunnel.
    """

    host: str
    port: int
    http_version: str
    headers: tuple[tuple[str, str], ...] = ()
    trailing_data: bytes = field(default=b"", repr=False)

    @property
    def is_ip_literal(self) -> bool:
        return is_ip_literal(self.host)

    @property
    def authority(self) -> str:
        """The target as written in a request line, IPv6 in brackets."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HeadParser:
    """Incremental parser for one request head.

    Feed received bytes to `feed`; it returns None while the head is
    incomplete. It rejects garbage as soon as the request line shows it, so a
    client speaking another protocol gets 400 without waiting for a timeout.
    """

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self._buffer = bytearray()
        self._max_head_bytes = max_head_bytes
        self._request_line_checked = False

    def feed(self, data: bytes) -> RequestHead | None:
        self._buffer += data
        if not self._request_line_checked:
            self._check_request_line_prefix()
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self._max_head_bytes:
                raise _head_too_large(self._max_head_bytes)
            return None
        head_length = end + 4
        if head_length > self._max_head_bytes:
            raise _head_too_large(self._max_head_bytes)
        head = bytes(self._buffer[:end])
        trailing = bytes(self._buffer[head_length:])
        return parse_head(head, trailing)

    def _check_request_line_prefix(self) -> None:
        # Step 1: before the first space only token characters may appear
        # (the method). Step 2: once the line ends, parse it whole.
        line_end = self._buffer.find(b"\r\n")
        if line_end >= 0:
            parse_request_line(bytes(self._buffer[:line_end]))
            self._request_line_checked = True
            return
        if b"\n" in self._buffer:
            raise RequestError(400, "request line must end with CRLF")
        method = bytes(self._buffer).partition(b" ")[0]
        if method and _TOKEN.fullmatch(method) is None:
            raise RequestError(400, "not an HTTP request (expected CONNECT host:port)")


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """Split `method SP request-target SP HTTP-version` (RFC 9112 section 3)."""
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise RequestError(
            400, "malformed request line (expected CONNECT host:port HTTP/1.1)"
        )
    method, target, version = parts
    if _TOKEN.fullmatch(method) is None:
        raise RequestError(400, "not an HTTP request (expected CONNECT host:port)")
    if _VERSION.fullmatch(version) is None:
        raise RequestError(400, f"malformed HTTP version {_show(version)}")
    if version not in SUPPORTED_VERSIONS:
        raise RequestError(
            505, f"HTTP version {_show(version)} is not supported (use HTTP/1.1)"
        )
    return method, target, version


def parse_head(head: bytes, trailing_data: bytes = b"") -> RequestHead:
    """Parse a complete head (without the final CRLFCRLF)."""
    request_line, *header_lines = head.split(b"\r\n")
    method, target, version = parse_request_line(request_line)
    headers = tuple(_parse_header_line(line) for line in header_lines)
    return RequestHead(
        method=method.decode("ascii"),
        target=target.decode("latin-1"),
        http_version=version.decode("ascii"),
        headers=headers,
        trailing_data=trailing_data,
    )


def parse_connect(head: RequestHead) -> ConnectRequest:
    """Validate that `head` is `CONNECT host:port` and split the target."""
    if head.method != "CONNECT":
        raise RequestError(
            405,
            f"method {head.method} is not allowed: this proxy only tunnels "
            "HTTPS with CONNECT host:port",
            headers=(("Allow", "CONNECT"),),
        )
    host, port = parse_authority(head.target)
    return ConnectRequest(
        host=host,
        port=port,
        http_version=head.http_version,
        headers=head.headers,
        trailing_data=head.trailing_data,
    )


def _parse_header_line(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        # Obsolete line folding (RFC 9112 section 5.2) is rejected, not joined.
        raise RequestError(400, "folded header lines are not supported")
    name, colon, value = line.partition(b":")
    if not colon or _TOKEN.fullmatch(name) is None:
        raise RequestError(400, f"malformed header line {_show(line)}")
    value = value.strip(b" \t")
    if _FIELD_VALUE.fullmatch(value) is None:
        raise RequestError(400, f"header {_show(name)} has control characters")
    return name.decode("ascii"), value.decode("latin-1")


def parse_authority(target: str) -> tuple[str, int]:
    """Split a CONNECT target `host:port` or `[v6]:port` and validate both."""
    if target.startswith("["):
        bracket_end = target.find("]")
        if bracket_end < 0 or target[bracket_end + 1 : bracket_end + 2] != ":":
            raise RequestError(
                400, f"malformed target {_quote(target)} (expected [v6]:port)"
            )
        host = target[1:bracket_end]
        port_text = target[bracket_end + 2 :]
        if "%" in host:
            # ipaddress accepts any text after "%" as a zone ID, control
            # bytes included, and a zone only names an interface of the
            # client's host, so it is rejected rather than passed on.
            raise RequestError(
                400,
                f"IPv6 zone IDs are not supported in target {_quote(target)} "
                "(use a global or loopback IPv6 address)",
            )
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise RequestError(
                400, f"invalid IPv6 address {_quote(host)} in target {_quote(target)}"
            ) from None
    else:
        host, colon, port_text = target.rpartition(":")
        if not colon or not host:
            raise RequestError(
                400, f"target {_quote(target)} has no port (use host:port)"
            )
        if ":" in host:
            raise RequestError(
                400,
                f"IPv6 address in {_quote(target)} must be in brackets: "
                f"[{ascii(host)[1:-1]}]:port",
            )
        host = _validate_host(host, target)
    return host, _parse_port(port_text, target)


def _validate_host(host: str, target: str) -> str:
    if is_ip_literal(host):
        return host
    undotted = host.removesuffix(".")
    if _NUMERIC_LABEL.fullmatch(undotted.rpartition(".")[2]):
        # WHATWG URL rules read a name whose last label is a number as IPv4,
        # and getaddrinfo() accepts "127.1", "2130706433" and "0x7f.1" as
        # 127.0.0.1. Only the canonical dotted quad is accepted, so the host
        # a client names is the address it reaches.
        if is_ip_literal(undotted) and "." in undotted:
            return undotted
        raise RequestError(
            400,
            f"invalid IPv4 address {_quote(host)} in target {_quote(target)} "
            "(use a dotted-quad IPv4 address such as 127.0.0.1)",
        )
    name = normalize_host_name(host)
    if name is None:
        raise RequestError(
            400, f"invalid host name {_quote(host)} in target {_quote(target)}"
        )
    return name


def normalize_host_name(host: str) -> str | None:
    """Lower-case a DNS name and drop its final dot; None if it is invalid."""
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > _MAX_DNS_NAME or not all(_DNS_LABEL.fullmatch(x) for x in labels):
        return None
    return name.lower()


def _parse_port(text: str, target: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise RequestError(
            400, f"invalid port {_quote(text)} in target {_quote(target)}"
        )
    port = int(text)
    if not 1 <= port <= 65535:
        raise RequestError(
            400, f"port {port} in target {_quote(target)} is out of range"
        )
    return port


def printable(text: object) -> str:
    """Escape the non-printable characters of `str(text)` as in a repr.

    Upstream certificates and client input reach messages and log lines,
    so a control byte in them must never start a new line there.
    """
    value = str(text)
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in value)


def _quote(text: str, limit: int = 80) -> str:
    """Quote client text for a message or log line: escaped and shortened.

    Every character that is not printable ASCII is escaped, so control
    bytes never reach a log line or a response body.
    """
    quoted = ascii(text[:limit])
    return quoted + ("..." if len(text) > limit else "")


def _head_too_large(limit: int) -> RequestError:
    return RequestError(431, f"request head is larger than {limit} bytes")


def _show(data: bytes, limit: int = 40) -> str:
    """Quote untrusted bytes for a message, shortened and with escapes."""
    text = repr(data[:limit])[1:]
    return text + ("..." if len(data) > limit else "")


def error_response(error: RequestError) -> bytes:
    """Build the response for a rejected request: text/plain, then close."""
    return text_response(error.status_code, str(error), error.headers)


def text_response(
    status_code: int,
    message: str,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """Build a complete response with a one-line text body and `Connection: close`."""
    body = (printable(message) + "\n").encode("utf-8")
    fields = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        *headers,
        ("Connection", "close"),
    ]
    return _status_line(status_code) + _fields(fields) + body


def established_response() -> bytes:
    """Build the 200 response that turns the connection into a tunnel."""
    return _status_line(200) + b"\r\n"


def _status_line(status_code: int) -> bytes:
    reason = _REASONS.get(status_code, "Error")
    return f"HTTP/1.1 {status_code} {reason}\r\n".encode("ascii")


def _fields(fields: list[tuple[str, str]]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields)
    return lines.encode("latin-1") + b"\r\n"
