"""The ClientHello peek: SNI and ALPN from real ClientHellos and broken ones."""

from __future__ import annotations

import ssl

import pytest

from kmsproxy.proxy.client_hello import (
    MAX_RECORD_FRAGMENT_BYTES,
    ClientHelloError,
    parse_client_hello,
)


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """Return the first flight of Python's own TLS client."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def refragment(data: bytes, size: int) -> bytes:
    """Split the one handshake record in `data` into records of `size` bytes."""
    assert data[0] == 0x16
    length = int.from_bytes(data[3:5], "big")
    fragment = data[5 : 5 + length]
    records = b""
    for start in range(0, len(fragment), size):
        piece = fragment[start : start + size]
        records += data[:3] + len(piece).to_bytes(2, "big") + piece
    return records


def test_sni_and_alpn() -> None:
    hello = parse_client_hello(client_hello("Example.TEST", ["h2", "http/1.1"]))
    assert hello is not None
    assert hello.server_name == "example.test"
    assert hello.alpn_protocols == ("h2", "http/1.1")


def test_no_sni_no_alpn() -> None:
    hello = parse_client_hello(client_hello(None))
    assert hello is not None
    assert hello.server_name is None
    assert hello.alpn_protocols == ()


def test_raw_keeps_every_byte() -> None:
    data = client_hello("a.test", ["h2"]) + b"early"
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.raw == data


def test_incomplete_returns_none() -> None:
    data = client_hello("a.test", ["h2"])
    for end in range(1, len(data)):
        assert parse_client_hello(data[:end]) is None, end
    assert parse_client_hello(data) is not None


def test_split_across_records() -> None:
    data = refragment(client_hello("a.test", ["h2", "http/1.1"]), 7)
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.server_name == "a.test"
    assert hello.alpn_protocols == ("h2", "http/1.1")


def test_plain_http_is_not_tls() -> None:
    with pytest.raises(ClientHelloError) as caught:
        parse_client_hello(b"GET / HTTP/1.1\r\n\r\n")
    assert caught.value.is_tls is False


def test_one_plain_byte_is_not_tls() -> None:
    with pytest.raises(ClientHelloError) as caught:
        parse_client_hello(b"G")
    assert caught.value.is_tls is False


def test_ssl2_version_rejected() -> None:
    with pytest.raises(ClientHelloError, match="not TLS"):
        parse_client_hello(b"\x16\x02\x00\x00\x10")


def test_oversized_record_rejected() -> None:
    header = b"\x16\x03\x01" + (MAX_RECORD_FRAGMENT_BYTES + 1).to_bytes(2, "big")
    with pytest.raises(ClientHelloError, match="outside"):
        parse_client_hello(header)


def test_server_hello_type_rejected() -> None:
    data = bytearray(client_hello("a.test"))
    data[5] = 2
    with pytest.raises(ClientHelloError, match="got type 2"):
        parse_client_hello(bytes(data))


def test_oversized_hello_rejected() -> None:
    record = b"\x16\x03\x01\x00\x04" + b"\x01\xff\xff\xff"
    with pytest.raises(ClientHelloError, match="larger than"):
        parse_client_hello(record)


def test_bytes_after_extensions_rejected() -> None:
    data = bytearray(client_hello("a.test"))
    # Append one byte to the ClientHello body, after its extensions, and
    # grow the record and message lengths to cover it.
    data += b"\x00"
    record_length = int.from_bytes(data[3:5], "big") + 1
    data[3:5] = record_length.to_bytes(2, "big")
    message_length = int.from_bytes(data[6:9], "big") + 1
    data[6:9] = message_length.to_bytes(3, "big")
    with pytest.raises(ClientHelloError, match="after its extensions"):
        parse_client_hello(bytes(data))


def build_hello(extensions: bytes) -> bytes:
    """Build a minimal ClientHello record around `extensions`."""
    body = (
        b"\x03\x03"
        + bytes(32)
        + b"\x00"
        + b"\x00\x02\x13\x01"
        + b"\x01\x00"
        + len(extensions).to_bytes(2, "big")
        + extensions
    )
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def extension(extension_type: int, data: bytes) -> bytes:
    return extension_type.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def alpn_extension(*names: bytes) -> bytes:
    names_data = b"".join(bytes([len(n)]) + n for n in names)
    return extension(16, len(names_data).to_bytes(2, "big") + names_data)


def sni_extension(name: bytes) -> bytes:
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    return extension(0, len(entry).to_bytes(2, "big") + entry)


def test_minimal_hello_parses() -> None:
    hello = parse_client_hello(build_hello(sni_extension(b"b.test")))
    assert hello is not None
    assert hello.server_name == "b.test"


def test_repeated_extension_rejected() -> None:
    data = build_hello(alpn_extension(b"h2") + alpn_extension(b"h2"))
    with pytest.raises(ClientHelloError, match="repeats extension 16"):
        parse_client_hello(data)


def test_empty_alpn_name_rejected() -> None:
    with pytest.raises(ClientHelloError, match="below 1"):
        parse_client_hello(build_hello(alpn_extension(b"h2", b"")))


def test_alpn_length_overrun_rejected() -> None:
    broken = extension(16, b"\x00\x09\x02h2")
    with pytest.raises(ClientHelloError, match="truncated"):
        parse_client_hello(build_hello(broken))


def test_ip_literal_sni_rejected() -> None:
    with pytest.raises(ClientHelloError, match="not a DNS name"):
        parse_client_hello(build_hello(sni_extension(b"127.0.0.1:443")))


def test_non_ascii_sni_rejected() -> None:
    with pytest.raises(ClientHelloError, match="not ASCII"):
        parse_client_hello(build_hello(sni_extension("bücher.test".encode())))
