"""One handshake with client authentication against each added real peer:
GnuTLS `gnutls-serv`, Go `crypto/tls`, Node.js `tls` and Apache httpd.

The helpers here (PKI files, the Go build, the echo exchange) are shared
with `test_interop_matrix.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from peers import (
    LOOPBACK,
    build_go_server,
    start_apache,
    start_gnutls_server,
    start_go_server,
    start_node_server,
)
from pki import Issued, KeyType, issue, make_ca

from kmsproxy.signer import SoftwareSigner
from kmsproxy.tls import (
    AlertDescription,
    AlertReceived,
    ClientIdentity,
    TLSClientConfig,
    TLSClientStream,
    TrustStore,
    connect_tls,
)
from kmsproxy.tls.messages import NamedGroup

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

SERVER_NAME = "server.test"

# Bound on receive() calls while reading one reply. s_server -rev sends each
# line in its own record, and 1 MiB of 77-byte lines is about 13,600 records.
MAX_READS = 50_000

# Time allowed for one echo exchange of up to 1 MiB each way on loopback.
# It takes well under a second on an idle machine; 60 s only guards a hang.
EXCHANGE_TIMEOUT_SECONDS = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Files:
    """A CA, its trust store, and the directory its PEM files live in."""

    directory: Path
    ca: Issued
    ca_path: Path
    trust: TrustStore

    def server(self, key_type: KeyType = "p256") -> tuple[Path, Path]:
        """Issue and write a server certificate; return (cert, key) paths."""
        server = issue(
            self.ca,
            "server",
            dns_names=(SERVER_NAME,),
            ip_addresses=(LOOPBACK,),
            key_type=key_type,
        )
        stem = f"server-{key_type}-{len(list(self.directory.iterdir()))}"
        key, cert = server.write(self.directory, stem)
        return cert, key

    def client(self, key_type: KeyType = "p256") -> ClientIdentity:
        client = issue(self.ca, f"client {key_type}", client=True, key_type=key_type)
        signer = SoftwareSigner(client.key, f"file:client-{key_type}.key")
        return ClientIdentity(tuple(client.chain), signer)

    def config(
        self, identity: ClientIdentity | None, **settings: object
    ) -> TLSClientConfig:
        identities = [identity] if identity is not None else []
        return TLSClientConfig(SERVER_NAME, identities, self.trust, **settings)  # type: ignore[arg-type]


def make_files(directory: Path, name: str = "interop CA") -> Files:
    ca = make_ca(name)
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.chain_pem())
    trust = TrustStore.load([ca_path], include_system=False)
    return Files(directory, ca, ca_path, trust)


@pytest.fixture
def pki(tmp_path: Path) -> Files:
    return make_files(tmp_path)


@pytest.fixture(scope="session")
def go_server_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go peer, built once per test session."""
    return build_go_server(tmp_path_factory.mktemp("go-build"))


async def open_tls(port: int, settings: TLSClientConfig) -> TLSClientStream:
    transport = await anyio.connect_tcp(LOOPBACK, port)
    try:
        return await connect_tls(transport, settings)
    except BaseException:
        await transport.aclose()
        raise


async def read_to_end(stream: TLSClientStream) -> bytes:
    """Read until the server's close_notify (anyio.EndOfStream)."""
    chunks: list[bytes] = []
    for _ in range(MAX_READS):
        try:
            chunks.append(await stream.receive())
        except anyio.EndOfStream:
            return b"".join(chunks)
    raise AssertionError(f"no close_notify after {MAX_READS} reads")


async def exchange(stream: TLSClientStream, payload: bytes) -> bytes:
    """Send `payload` then close_notify while reading until the server's
    close_notify; return everything received.

    Sending and receiving run concurrently, so an echo server never blocks
    on a full socket buffer.
    """
    received = b""

    async def receive_all() -> None:
        nonlocal received
        received = await read_to_end(stream)

    with anyio.fail_after(EXCHANGE_TIMEOUT_SECONDS):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(receive_all)
            await stream.send(payload)
            await stream.send_eof()
    return received


def split_header(reply: bytes) -> tuple[dict[str, str], bytes]:
    """Split the Go or Node peer's first line into fields and return the rest.

    The line is `subject=CN=... group=... ...`; the subject's own value
    contains no space in these tests (`CN=client p256`, hence the join).
    """
    line, _, rest = reply.partition(b"\n")
    fields: dict[str, str] = {}
    key = ""
    for word in line.decode().split(" "):
        if "=" in word and not word.startswith("CN="):
            key, _, value = word.partition("=")
            fields[key] = value
        else:
            fields[key] += " " + word
    return fields, rest


# GnuTLS


async def test_gnutls_echo(pki: Files) -> None:
    cert, key = pki.server()
    identity = pki.client()
    with start_gnutls_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, pki.config(identity))
        async with stream:
            reply = await exchange(stream, b"hello gnutls\n")
        log = peer.log()
    assert reply == b"hello gnutls\n"
    assert stream.client_identity == identity
    assert "CN=client p256" in log


# Go


async def test_go_reports_subject(pki: Files, go_server_binary: Path) -> None:
    cert, key = pki.server()
    identity = pki.client()
    with start_go_server(
        pki.directory, go_server_binary, cert, key, pki.ca_path
    ) as peer:
        stream = await open_tls(peer.port, pki.config(identity))
        async with stream:
            reply = await exchange(stream, b"hello go\n")
    fields, echoed = split_header(reply)
    assert fields["subject"] == "CN=client p256"
    assert fields["resumed"] == "false"
    assert fields["version"] == "TLS 1.3"
    assert fields["suite"] == stream.cipher_suite
    assert echoed == b"hello go\n"


async def test_go_hybrid_group(pki: Files, go_server_binary: Path) -> None:
    cert, key = pki.server()
    with start_go_server(
        pki.directory, go_server_binary, cert, key, pki.ca_path
    ) as peer:
        stream = await open_tls(peer.port, pki.config(pki.client()))
        async with stream:
            reply = await exchange(stream, b"")
    fields, _ = split_header(reply)
    assert fields["group"] == "X25519MLKEM768"
    assert stream.connection.key_exchange_group == NamedGroup.X25519MLKEM768
    assert not stream.connection.hello_retry_requested


# Node.js


async def test_node_reports_subject(pki: Files) -> None:
    cert, key = pki.server()
    identity = pki.client()
    with start_node_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, pki.config(identity))
        async with stream:
            reply = await exchange(stream, b"hello node\n")
    fields, echoed = split_header(reply)
    assert fields["subject"] == "CN=client p256"
    assert fields["version"] == "TLSv1.3"
    assert fields["suite"] == stream.cipher_suite
    assert echoed == b"hello node\n"


async def test_node_hybrid_group(pki: Files) -> None:
    cert, key = pki.server()
    with start_node_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, pki.config(pki.client()))
        async with stream:
            await exchange(stream, b"")
    # Node reports no group on a server socket, so the client's view decides.
    assert stream.connection.key_exchange_group == NamedGroup.X25519MLKEM768
    assert not stream.connection.hello_retry_requested


async def test_node_requires_certificate(pki: Files) -> None:
    cert, key = pki.server()
    with start_node_server(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, pki.config(None))
        async with stream:
            # TLS 1.3 servers reject a missing certificate after our
            # Finished, so the handshake completes and the alert follows.
            with pytest.raises(AlertReceived) as raised:
                await read_to_end(stream)
        rejected = peer.wait_for_log("handshake failed")
    assert raised.value.description == AlertDescription.certificate_required
    assert rejected


# Apache httpd


def http_request(
    method: str, path: str, body: bytes = b"", version: str = "HTTP/1.1"
) -> bytes:
    """Return an HTTP request with `Connection: close`.

    Use `HTTP/1.0` where the response must not be chunked.
    """
    head = (
        f"{method} {path} {version}\r\nHost: {SERVER_NAME}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def http_exchange(stream: TLSClientStream, request: bytes) -> bytes:
    """Send `request` and read the response until the server's close_notify.

    Unlike `exchange`, this sends no close_notify before the response, so
    the server can still ask for a certificate (post-handshake auth).
    """
    received = b""

    async def receive_all() -> None:
        nonlocal received
        received = await read_to_end(stream)

    with anyio.fail_after(EXCHANGE_TIMEOUT_SECONDS):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(receive_all)
            await stream.send(request)
    return received


async def test_apache_open_path(pki: Files) -> None:
    cert, key = pki.server()
    with start_apache(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, pki.config(pki.client()))
        async with stream:
            reply = await http_exchange(stream, http_request("GET", "/open"))
        access = peer.access_log()
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"\r\n\r\nopen\n")
    assert stream.client_identity is None
    assert access == ["-|GET /open HTTP/1.1|200"]


async def test_apache_protected_path(pki: Files) -> None:
    cert, key = pki.server()
    with start_apache(pki.directory, cert, key, pki.ca_path) as peer:
        stream = await open_tls(peer.port, pki.config(pki.client()))
        async with stream:
            reply = await http_exchange(stream, http_request("GET", "/protected/page"))
        access = peer.access_log()
        log = peer.log()
    assert reply.startswith(b"HTTP/1.1 200"), log
    assert reply.endswith(b"\r\n\r\nprotected\n")
    assert access == ["CN=client p256|GET /protected/page HTTP/1.1|200"]
