"""`kmsproxy demo`: a complete mutual-TLS round trip on loopback.

The demo needs only Python and this package. It creates throwaway CAs, a
server certificate and a file-backed client identity in a temporary
directory. It starts a Python `ssl` upstream that requires a client
certificate and runs the same proxy that `kmsproxy serve` runs. A Python
client then fetches a page through the proxy, and the demo prints what the
upstream saw and stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
import logging
import ssl
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmsproxy.ca import create_ca_certificate
from kmsproxy.cli.init import create_ca
from kmsproxy.cli.serve import add_serve_arguments, config_from_args
from kmsproxy.errors import UserError
from kmsproxy.proxy import Proxy

logger = logging.getLogger(__name__)

# Upper bound for the whole demo; on loopback it takes well under a second.
DEMO_TIMEOUT_SECONDS = 30.0

# Maximum bytes of an HTTP head or body the demo's client and server read.
MAX_MESSAGE_BYTES = 64 * 1024

# Lifetime of the demo's throwaway certificates.
DEMO_CERTIFICATE_LIFETIME = datetime.timedelta(days=1)

CLIENT_NAME = "kmsproxy demo client"


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "demo",
        help="run a mutual-TLS round trip through the proxy on loopback",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log at DEBUG")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="kmsproxy-demo-") as directory:
        anyio.run(run_demo, Path(directory), sys.stdout)
    return 0


@dataclasses.dataclass
class _Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_authority(common_name: str) -> _Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    return _Authority(key, create_ca_certificate(key, common_name))


def _issue(
    authority: _Authority,
    common_name: str,
    *,
    client: bool,
    ip_addresses: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = (
        ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + DEMO_CERTIFICATE_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                authority.key.public_key()
            ),
            critical=False,
        )
    )
    if ip_addresses:
        names = [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return key, builder.sign(authority.key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclasses.dataclass
class DemoFiles:
    """Paths of every file the demo creates."""

    ca_key: Path
    ca_certificate: Path
    client_key: Path
    client_certificate: Path
    client_ca: Path
    upstream_ca: Path
    server_key: Path
    server_certificate: Path


def create_demo_files(directory: Path, server_ip: str = "127.0.0.1") -> DemoFiles:
    """Create the local CA, an upstream CA and server, a client CA and client."""
    ca_key, ca_certificate = create_ca(directory, "kmsproxy demo CA", force=True)
    upstream_ca = _new_authority("demo upstream CA")
    server_key, server = _issue(
        upstream_ca, "demo upstream", client=False, ip_addresses=(server_ip,)
    )
    client_ca = _new_authority("demo client CA")
    client_key, client = _issue(client_ca, CLIENT_NAME, client=True)
    return DemoFiles(
        ca_key=ca_key,
        ca_certificate=ca_certificate,
        client_key=_write(directory / "client.key", _key_pem(client_key), 0o600),
        client_certificate=_write(directory / "client.crt", _pem(client)),
        client_ca=_write(directory / "client-ca.crt", _pem(client_ca.certificate)),
        upstream_ca=_write(
            directory / "upstream-ca.crt", _pem(upstream_ca.certificate)
        ),
        server_key=_write(directory / "server.key", _key_pem(server_key), 0o600),
        server_certificate=_write(directory / "server.crt", _pem(server)),
    )


def upstream_context(files: DemoFiles) -> ssl.SSLContext:
    """Build the upstream's context: TLS 1.3, a client certificate required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(files.server_certificate, files.server_key)
    context.load_verify_locations(files.client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def _read_head(stream: anyio.abc.ByteStream) -> tuple[bytes, bytes]:
    """Read up to the blank line; return (head, bytes after it)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_MESSAGE_BYTES:
            raise UserError("demo: HTTP head too large")
        buffer += await stream.receive()
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


async def serve_mtls_upstream(
    host: str,
    context: ssl.SSLContext,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTPS on `host`; each response contains the client's subject."""

    async def handle(client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                stream = await TLSStream.wrap(
                    client, server_side=True, ssl_context=context
                )
                await _read_head(stream)
            except (ssl.SSLError, OSError, anyio.EndOfStream) as error:
                logger.info("Demo upstream rejected a connection error=%s", error)
                return
            # anyio's typed attribute lookup (ruff mistakes it for Django's).
            der = stream.extra(TLSAttribute.peer_certificate_binary)  # noqa: S610
            if der is None:
                return
            subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
            body = f"hello from the upstream; client certificate subject={subject}\n"
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n".encode()
                + b"Connection: close\r\n\r\n"
                + body.encode()
            )
            await stream.aclose()

    listener = await anyio.create_tcp_listener(local_host=host, local_port=0)
    async with listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        task_status.started(port)
        await listener.serve(handle)


async def fetch_through_proxy(
    proxy: tuple[str, int],
    target_host: str,
    target_port: int,
    ca_certificate: Path,
) -> bytes:
    """CONNECT through the proxy, then GET / over TLS trusting the local CA.

    Return the response body. Raise `UserError` if the proxy refuses.
    """
    authority = f"[{target_host}]" if ":" in target_host else target_host
    context = ssl.create_default_context(cafile=str(ca_certificate))
    async with await anyio.connect_tcp(*proxy) as stream:
        request = f"CONNECT {authority}:{target_port} HTTP/1.1\r\n"
        request += f"Host: {authority}:{target_port}\r\n\r\n"
        await stream.send(request.encode())
        head, _ = await _read_head(stream)
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if status_line.split(" ")[1:2] != ["200"]:
            raise UserError(f"demo: the proxy rejected the tunnel: {status_line}")
        tls = await TLSStream.wrap(
            stream, hostname=target_host, ssl_context=context, standard_compatible=False
        )
        get = f"GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        await tls.send(get.encode())
        response = b""
        while len(response) < MAX_MESSAGE_BYTES:
            try:
                response += await tls.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
    return response.partition(b"\r\n\r\n")[2]


async def run_demo(directory: Path, out: TextIO, host: str = "127.0.0.1") -> str:
    """Run the demo in `directory`; print each step and return the body."""
    files = create_demo_files(directory, host)
    print(
        f"Created a throwaway CA and client identity in {directory}\n"
        "  The demo deletes this directory when it ends.",
        file=out,
        flush=True,
    )
    arguments = [
        str(files.ca_key),
        str(files.ca_certificate),
        "--clientkey",
        str(files.client_key),
        "--clientcert",
        str(files.client_certificate),
        "--trust",
        str(files.upstream_ca),
        "--listen",
        f"{host}:0" if ":" not in host else f"[{host}]:0",
    ]
    parser = argparse.ArgumentParser(prog="kmsproxy serve")
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(arguments))
    # The demo fetches through the proxy port only, so no PAC listener.
    config = dataclasses.replace(config, handle_signals=False, pac_listen=None)

    with anyio.fail_after(DEMO_TIMEOUT_SECONDS):
        async with anyio.create_task_group() as group:
            upstream_port = await group.start(
                serve_mtls_upstream, host, upstream_context(files)
            )
            print(
                f"Upstream https://{host}:{upstream_port}/ requires a client "
                "certificate",
                file=out,
                flush=True,
            )

            addresses = await group.start(Proxy(config).serve)
            proxy = addresses.proxy[0]
            print(f"Proxy listening on http://{proxy}", file=out, flush=True)

            body = await fetch_through_proxy(
                (proxy.host, proxy.port), host, upstream_port, files.ca_certificate
            )
            group.cancel_scope.cancel()

    text = body.decode("utf-8", "replace")
    print(
        f"Fetched through the proxy; the upstream replied:\n  {text}", file=out, end=""
    )
    return text
