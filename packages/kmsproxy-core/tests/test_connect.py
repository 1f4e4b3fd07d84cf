"""The CONNECT head parser and the responses it builds, byte by byte."""

from __future__ import annotations

import http.client
import io

import pytest

from kmsproxy.proxy.connect import (
    MAX_HEAD_BYTES,
    ConnectRequest,
    HeadParser,
    RequestError,
    error_response,
    established_response,
    parse_authority,
    parse_connect,
    printable,
    text_response,
)


def parse(data: bytes) -> ConnectRequest:
    head = HeadParser().feed(data)
    assert head is not None
    return parse_connect(head)


def rejection(data: bytes) -> RequestError:
    try:
        head = HeadParser().feed(data)
        assert head is not None, "head incomplete, nothing rejected"
        parse_connect(head)
    except RequestError as error:
        return error
    raise AssertionError(f"{data!r} was accepted")


def test_connect_dns_name() -> None:
    request = parse(b"CONNECT Example.COM:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert request.host == "example.com"
    assert request.port == 443
    assert request.headers == (("Host", "example.com"),)


def test_connect_ipv6_in_brackets() -> None:
    request = parse(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n")
    assert request.host == "::1"
    assert request.port == 8443
    assert request.is_ip_literal
    assert request.authority == "[::1]:8443"


def test_connect_ipv4() -> None:
    request = parse(b"CONNECT 127.0.0.1:443 HTTP/1.0\r\n\r\n")
    assert request.host == "127.0.0.1"
    assert request.http_version == "HTTP/1.0"


def test_connect_byte_by_byte() -> None:
    data = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"
    parser = HeadParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    head = results[-1]
    assert head is not None
    assert head.target == "a.test:443"


def test_connect_keeps_trailing_bytes() -> None:
    request = parse(b"CONNECT a.test:443 HTTP/1.1\r\n\r\n\x16\x03\x01\x02\x00")
    assert request.trailing_data == b"\x16\x03\x01\x02\x00"


def test_get_is_405_with_allow() -> None:
    error = rejection(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert error.status_code == 405
    assert ("Allow", "CONNECT") in error.headers
    assert "only tunnels HTTPS" in str(error)


def test_405_waits_for_whole_head() -> None:
    assert HeadParser().feed(b"GET / HTTP/1.1\r\nHost: a") is None


def test_garbage_is_400_before_line_end() -> None:
    error = rejection(b"\x00\x01\x02\xffgarbage")
    assert error.status_code == 400


def test_tls_client_hello_is_400() -> None:
    error = rejection(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
    assert error.status_code == 400


def test_bare_lf_is_400() -> None:
    error = rejection(b"CONNECT a.test:443 HTTP/1.1\n\n")
    assert error.status_code == 400


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT a.test:443\r\n\r\n",
        b"CONNECT  a.test:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a.test:443 HTTP/1.1 extra\r\n\r\n",
        b"CONNECT a.test:443 HTTX/1.1\r\n\r\n",
    ],
)
def test_malformed_request_line_is_400(line: bytes) -> None:
    assert rejection(line).status_code == 400


def test_http2_version_is_505() -> None:
    assert rejection(b"CONNECT a.test:443 HTTP/2.0\r\n\r\n").status_code == 505


@pytest.mark.parametrize(
    "header",
    [b"no colon", b"bad name: x", b" folded: x", b"X-Ctl: a\x01b"],
)
def test_malformed_header_is_400(header: bytes) -> None:
    data = b"CONNECT a.test:443 HTTP/1.1\r\n" + header + b"\r\n\r\n"
    assert rejection(data).status_code == 400


@pytest.mark.parametrize(
    "target",
    ["a.test", "a.test:", "a.test:0", "a.test:65536", "a.test:+443", "a.test:4 43"],
)
def test_bad_port_is_400(target: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_authority(target)
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    "target",
    ["::1:443", "[::1]443", "[not-v6]:443", "-a.test:443", "a..test:443", ":443"],
)
def test_bad_host_is_400(target: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_authority(target)
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    "target",
    ["[::1%x\n2026-01-01\tforged]:1", "[fe80::1%eth0]:443", "[fe80::1%25eth0]:443"],
)
def test_ipv6_zone_id_is_400(target: str) -> None:
    with pytest.raises(RequestError, match="zone IDs are not supported") as caught:
        parse_authority(target)
    assert caught.value.status_code == 400


def test_rejection_escapes_control_bytes() -> None:
    error = rejection(b"CONNECT [::1%x\n\x00\x85\xff]:1 HTTP/1.1\r\n\r\n")
    body = error_response(error).partition(b"\r\n\r\n")[2]
    assert body.isascii()
    assert all(byte >= 0x20 for byte in body[:-1])
    assert str(error).isprintable()


@pytest.mark.parametrize(
    "host", ["0", "127.1", "2130706433", "0x7f.1", "0x7f000001", "a.0x10", "1.2.3.4.5"]
)
def test_ipv4_shorthand_is_400(host: str) -> None:
    with pytest.raises(RequestError, match="use a dotted-quad") as caught:
        parse_authority(f"{host}:443")
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("127.0.0.1.:443", "127.0.0.1"),
        ("a1.test:443", "a1.test"),
        ("0x.test:1", "0x.test"),
    ],
)
def test_numeric_looking_names_kept(target: str, host: str) -> None:
    assert parse_authority(target)[0] == host


def test_response_body_escapes_controls() -> None:
    response = text_response(502, "certificate 'CN=a\nINFO forged\x00' rejected")
    body = response.partition(b"\r\n\r\n")[2]
    assert body == b"certificate 'CN=a\\nINFO forged\\x00' rejected\n"


def test_printable_keeps_unicode_letters() -> None:
    assert printable("café\u2028x") == "café\\u2028x"


def test_unbracketed_ipv6_names_fix() -> None:
    with pytest.raises(RequestError, match=r"\[::1\]:port"):
        parse_authority("::1:443")


def test_oversized_head_is_431() -> None:
    data = b"CONNECT a.test:443 HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_BYTES
    assert rejection(data).status_code == 431


def test_oversized_complete_head_is_431() -> None:
    parser = HeadParser(max_head_bytes=64)
    with pytest.raises(RequestError) as caught:
        parser.feed(b"CONNECT a.test:443 HTTP/1.1\r\nX: " + b"a" * 40 + b"\r\n\r\n")
    assert caught.value.status_code == 431


def test_head_at_limit_is_accepted() -> None:
    start = b"CONNECT a.test:443 HTTP/1.1\r\nX: "
    filler = b"a" * (MAX_HEAD_BYTES - len(start) - 4)
    assert parse(start + filler + b"\r\n\r\n").port == 443


def read_with_http_client(data: bytes) -> tuple[http.client.HTTPResponse, bytes]:
    class FakeSocket:
        def makefile(self, mode: str) -> io.BytesIO:
            return io.BytesIO(data)

    response = http.client.HTTPResponse(FakeSocket(), method="CONNECT")  # type: ignore[arg-type]
    response.begin()
    return response, response.read()


def test_error_response_parses_in_stdlib() -> None:
    error = RequestError(405, "only CONNECT", headers=(("Allow", "CONNECT"),))
    response, body = read_with_http_client(error_response(error))
    assert response.status == 405
    assert response.getheader("Allow") == "CONNECT"
    assert response.getheader("Connection") == "close"
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert body == b"only CONNECT\n"


def test_502_body_is_reason() -> None:
    response, body = read_with_http_client(text_response(502, "connection refused"))
    assert response.status == 502
    assert body == b"connection refused\n"


def test_established_response() -> None:
    assert established_response() == b"HTTP/1.1 200 Connection established\r\n\r\n"
