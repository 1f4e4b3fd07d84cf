"""The peer harness itself, checked with Python's `ssl` client."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from peers import LOOPBACK, start_nginx, start_openssl_server
from pki import Issued, issue, make_ca

pytestmark = pytest.mark.interop


def _write_pki(tmp_path: Path) -> tuple[Path, Path, Path, Issued]:
    ca = make_ca()
    server = issue(ca, "server", dns_names=("server.test",))
    client = issue(ca, "client one", client=True)
    key, cert = server.write(tmp_path, "server")
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca.chain_pem())
    return cert, key, ca_path, client


def _client_context(tmp_path: Path, ca_path: Path, client: Issued) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_path))
    key, cert = client.write(tmp_path, "client")
    context.load_cert_chain(cert, key)
    return context


def _get(context: ssl.SSLContext, port: int, path: str) -> bytes:
    request = f"GET {path} HTTP/1.0\r\nHost: server.test\r\n\r\n".encode()
    with (
        socket.create_connection((LOOPBACK, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="server.test") as tls,
    ):
        tls.sendall(request)
        chunks = []
        for _ in range(1000):
            chunk = tls.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_nginx_reports_subject(tmp_path: Path) -> None:
    cert, key, ca_path, client = _write_pki(tmp_path)
    context = _client_context(tmp_path, ca_path, client)
    with start_nginx(tmp_path, cert, key, ca_path) as peer:
        response = _get(context, peer.port, "/subject")
        assert response.startswith(b"HTTP/1.1 200")
        assert response.endswith(b"subject=CN=client one\n")
        assert peer.client_subjects() == ["CN=client one"]


def test_nginx_stops_by_pid(tmp_path: Path) -> None:
    cert, key, ca_path, _ = _write_pki(tmp_path)
    peer = start_nginx(tmp_path, cert, key, ca_path)
    peer.stop()
    assert peer.process.returncode is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, peer.port), timeout=1).close()


def test_s_server_www_names_client(tmp_path: Path) -> None:
    cert, key, ca_path, client = _write_pki(tmp_path)
    context = _client_context(tmp_path, ca_path, client)
    with start_openssl_server(tmp_path, cert, key, ca_path) as peer:
        response = _get(context, peer.port, "/")
        assert response.startswith(b"HTTP/1.0 200")
        assert b"TLSv1.3" in response
        assert b"CN=client one" in response or b"CN = client one" in response


def test_s_server_rejects_without_cert(tmp_path: Path) -> None:
    cert, key, ca_path, _ = _write_pki(tmp_path)
    context = ssl.create_default_context(cafile=str(ca_path))
    with (
        start_openssl_server(tmp_path, cert, key, ca_path) as peer,
        pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"),
    ):
        _get(context, peer.port, "/")
