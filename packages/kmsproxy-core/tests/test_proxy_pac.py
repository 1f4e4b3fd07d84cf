"""The PAC listener's responses, without I/O."""

from __future__ import annotations

from pathlib import Path

from kmsproxy.proxy.connect import RequestHead
from kmsproxy.proxy.pac import PAC_MEDIA_TYPE, pac_response


def head(method: str, target: str = "/proxy.pac") -> RequestHead:
    return RequestHead(method, target, "HTTP/1.1")


def test_get_serves_file(tmp_path: Path) -> None:
    pac = tmp_path / "proxy.pac"
    pac.write_text("function FindProxyForURL(u, h) { return 'DIRECT'; }")
    response = pac_response(head("GET", "/anything"), pac)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Type: {PAC_MEDIA_TYPE}\r\n".encode() in response
    assert response.endswith(b"return 'DIRECT'; }")


def test_head_has_no_body(tmp_path: Path) -> None:
    pac = tmp_path / "proxy.pac"
    pac.write_text("x")
    response = pac_response(head("HEAD"), pac)
    assert b"Content-Length: 1\r\n" in response
    assert response.endswith(b"\r\n\r\n")


def test_no_file_is_404() -> None:
    assert pac_response(head("GET"), None).startswith(b"HTTP/1.1 404 ")


def test_unreadable_file_is_404(tmp_path: Path) -> None:
    response = pac_response(head("GET"), tmp_path / "missing.pac")
    assert response.startswith(b"HTTP/1.1 404 ")
    assert b"missing.pac" in response


def test_post_is_405() -> None:
    response = pac_response(head("POST"), None)
    assert response.startswith(b"HTTP/1.1 405 ")
    assert b"Allow: GET, HEAD\r\n" in response
