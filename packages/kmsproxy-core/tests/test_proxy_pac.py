"""The PAC listener's responses, and which files it serves."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import pytest

from kmsproxy.errors import UserError
from kmsproxy.proxy import pac as pac_module
from kmsproxy.proxy.connect import RequestHead
from kmsproxy.proxy.pac import (
    MAX_PAC_BYTES,
    PAC_MEDIA_TYPE,
    check_pac_file,
    pac_response,
)

pytestmark = pytest.mark.anyio

# Upper bound for one response; a FIFO that blocked would exceed it.
STEP_TIMEOUT_SECONDS = 10.0

# Read timeout in the hung-read test, and its polling step.
SHORT_READ_SECONDS = 0.05


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def head(method: str, target: str = "/proxy.pac") -> RequestHead:
    return RequestHead(method, target, "HTTP/1.1")


async def test_get_serves_file(tmp_path: Path) -> None:
    pac = tmp_path / "proxy.pac"
    pac.write_text("function FindProxyForURL(u, h) { return 'DIRECT'; }")
    response = await pac_response(head("GET", "/anything"), pac)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Type: {PAC_MEDIA_TYPE}\r\n".encode() in response
    assert response.endswith(b"return 'DIRECT'; }")


async def test_head_has_no_body(tmp_path: Path) -> None:
    pac = tmp_path / "proxy.pac"
    pac.write_text("x")
    response = await pac_response(head("HEAD"), pac)
    assert b"Content-Length: 1\r\n" in response
    assert response.endswith(b"\r\n\r\n")


async def test_no_file_is_404() -> None:
    response = await pac_response(head("GET"), None)
    assert response.startswith(b"HTTP/1.1 404 ")


async def test_missing_file_is_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    response = await pac_response(head("GET"), tmp_path / "missing.pac")
    assert response.startswith(b"HTTP/1.1 500 ")
    assert b"not found" in response
    # The path goes to the log only, not to any client.
    assert b"missing.pac" not in response
    assert "missing.pac" in caplog.text


async def test_fifo_is_500_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "proxy.pac"
    os.mkfifo(fifo)
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        response = await pac_response(head("GET"), fifo)
    assert response.startswith(b"HTTP/1.1 500 ")
    assert b"not a regular file" in response


async def test_symlink_to_device_is_500(tmp_path: Path) -> None:
    link = tmp_path / "proxy.pac"
    link.symlink_to("/dev/zero")
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        response = await pac_response(head("GET"), link)
    assert response.startswith(b"HTTP/1.1 500 ")
    assert b"not a regular file" in response


async def test_symlink_to_file_served(tmp_path: Path) -> None:
    target = tmp_path / "real.pac"
    target.write_text("linked")
    link = tmp_path / "proxy.pac"
    link.symlink_to(target)
    response = await pac_response(head("GET"), link)
    assert response.endswith(b"\r\n\r\nlinked")


async def test_oversized_file_is_500(tmp_path: Path) -> None:
    pac = tmp_path / "proxy.pac"
    pac.write_bytes(b"x" * (MAX_PAC_BYTES + 1))
    response = await pac_response(head("GET"), pac)
    assert response.startswith(b"HTTP/1.1 500 ")
    assert b"larger than" in response


async def test_file_at_limit_served(tmp_path: Path) -> None:
    pac = tmp_path / "proxy.pac"
    pac.write_bytes(b"x" * MAX_PAC_BYTES)
    response = await pac_response(head("GET"), pac)
    assert response.startswith(b"HTTP/1.1 200 ")


def test_missing_file_fails_start(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="PAC file was not found"):
        check_pac_file(tmp_path / "nope.js")


def test_directory_fails_start(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a regular file"):
        check_pac_file(tmp_path)


async def test_post_is_405() -> None:
    response = await pac_response(head("POST"), None)
    assert response.startswith(b"HTTP/1.1 405 ")
    assert b"Allow: GET, HEAD\r\n" in response


async def test_hung_reads_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read blocked like one on a hung network file system.
    pac = tmp_path / "proxy.pac"
    pac.write_text("function FindProxyForURL(url, host) { return 'DIRECT'; }")
    release = threading.Event()
    real_read = pac_module.read_pac_file

    def hung_read(path: Path) -> bytes:
        release.wait(STEP_TIMEOUT_SECONDS)
        return real_read(path)

    monkeypatch.setattr(pac_module, "read_pac_file", hung_read)
    monkeypatch.setattr(pac_module, "PAC_READ_TIMEOUT_SECONDS", SHORT_READ_SECONDS)
    readers = anyio.CapacityLimiter(1)
    with anyio.fail_after(STEP_TIMEOUT_SECONDS):
        timed_out = await pac_response(head("GET"), pac, readers)
        busy = await pac_response(head("GET"), pac, readers)
        release.set()
        while readers.borrowed_tokens:
            await anyio.sleep(SHORT_READ_SECONDS)
        served = await pac_response(head("GET"), pac, readers)
    assert timed_out.startswith(b"HTTP/1.1 500 ")
    assert b"timed out" in timed_out
    assert busy.startswith(b"HTTP/1.1 500 ")
    assert b"have not returned yet" in busy
    assert served.startswith(b"HTTP/1.1 200 ")


async def test_served_without_nonblock_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows has no os.O_NONBLOCK.
    monkeypatch.delattr(os, "O_NONBLOCK")
    pac = tmp_path / "proxy.pac"
    pac.write_text("function FindProxyForURL(url, host) { return 'DIRECT'; }")
    response = await pac_response(head("GET"), pac)
    assert response.startswith(b"HTTP/1.1 200 ")
