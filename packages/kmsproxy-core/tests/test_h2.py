"""HTTP/2 and ALPN pass-through: curl and an h2 client to nginx via the proxy."""

from __future__ import annotations

import datetime
import logging
import ssl
from collections.abc import Iterator

import anyio
import anyio.abc
import h2.config
import h2.connection
import h2.events
import pytest
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509
from peers import Peer, start_nginx
from pki import issue, make_ca
from proxy_site import (
    REQUEST_TIMEOUT_SECONDS,
    Site,
    curl_through,
    nginx_for,
    proxy_address,
    running,
    site,
)

from kmsproxy import Proxy, ProxyAddresses
from kmsproxy.proxy import tunnel
from kmsproxy.proxy.error_leaf import ERROR_LEAF_LIFETIME
from kmsproxy.proxy.tunnel import alert_record
from kmsproxy.tls import AlertDescription

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Fixtures shared through proxy_site.
__all__ = ["running", "site"]

# Receives from one connection before a test gives up waiting for its end.
MAX_H2_READS = 100


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def read_to_end(stream: anyio.abc.ByteStream) -> bytes:
    """Read until the peer closes or resets the connection (bounded)."""
    data = b""
    for _ in range(MAX_H2_READS):
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data
    pytest.fail(f"connection still open after {MAX_H2_READS} reads")


@pytest.fixture
def nginx_h2(site: Site) -> Iterator[Peer]:
    with nginx_for(site, http2=True, name="nginx-h2") as peer:
        yield peer


@pytest.fixture
def stranger_h2(site: Site) -> Iterator[Peer]:
    """nginx with HTTP/2 and a certificate from a CA the proxy does not trust."""
    stranger = issue(make_ca("stranger CA"), "localhost", dns_names=("localhost",))
    key, cert = stranger.write(site.directory, "stranger")
    with start_nginx(
        site.directory,
        cert,
        key,
        site.path("client-ca.crt"),
        http2=True,
        name="stranger",
    ) as peer:
        yield peer


async def open_tunnel(
    addresses: ProxyAddresses,
    site: Site,
    port: int,
    alpn: list[str],
    host: str = "localhost",
    server_name: str = "localhost",
) -> TLSStream:
    """CONNECT through the proxy and start TLS that trusts the local CA."""
    stream = await anyio.connect_tcp(*proxy_address(addresses))
    await stream.send(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += await stream.receive()
    assert response.startswith(b"HTTP/1.1 200 "), response
    context = ssl.create_default_context(cafile=site.path("ca.crt"))
    context.set_alpn_protocols(alpn)
    try:
        return await TLSStream.wrap(
            stream,
            hostname=server_name,
            ssl_context=context,
            standard_compatible=False,
        )
    except BaseException:
        await stream.aclose()
        raise


async def h2_get(stream: TLSStream, authority: str, path: str) -> tuple[int, bytes]:
    """Send one GET over HTTP/2; return the status and the body."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    stream_id = connection.get_next_available_stream_id()
    request_headers = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", authority),
        (":path", path),
    ]
    connection.send_headers(stream_id, request_headers, end_stream=True)
    await stream.send(connection.data_to_send())
    status = 0
    body = b""
    for _ in range(MAX_H2_READS):
        for event in connection.receive_data(await stream.receive()):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                connection.acknowledge_received_data(
                    event.flow_controlled_length, stream_id
                )
            elif isinstance(event, h2.events.StreamEnded):
                return status, body
        pending = connection.data_to_send()
        if pending:
            await stream.send(pending)
    pytest.fail(f"no complete h2 response within {MAX_H2_READS} reads")


async def test_curl_http2_via_http_proxy(
    site: Site, nginx_h2: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    result = await curl_through(
        addresses.proxy_url,
        site,
        "--http2",
        "--write-out",
        " version=%{http_version}",
        f"https://localhost:{nginx_h2.port}/subject",
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=proxy client\n version=2"
    assert nginx_h2.client_subjects() == ["CN=proxy client"]
    assert nginx_h2.access_log() == ["CN=proxy client|GET /subject HTTP/2.0|200"]


async def test_curl_http2_via_https_proxy(
    site: Site, nginx_h2: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    host, port = proxy_address(addresses)
    result = await curl_through(
        f"https://{host}:{port}",
        site,
        "--http2",
        "--proxy-cacert",
        str(site.path("ca.crt")),
        "--write-out",
        " version=%{http_version}",
        f"https://localhost:{nginx_h2.port}/subject",
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=proxy client\n version=2"


async def test_curl_http1_to_h2_upstream(
    site: Site, nginx_h2: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    result = await curl_through(
        addresses.proxy_url,
        site,
        "--http1.1",
        "--write-out",
        " version=%{http_version}",
        f"https://localhost:{nginx_h2.port}/subject",
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=proxy client\n version=1.1"


async def test_curl_http2_to_http1_upstream(
    site: Site, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    with nginx_for(site) as peer:
        result = await curl_through(
            addresses.proxy_url,
            site,
            "--http2",
            "--write-out",
            " version=%{http_version}",
            f"https://localhost:{peer.port}/subject",
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=proxy client\n version=1.1"


async def test_h2_client_through_proxy(
    site: Site, nginx_h2: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        stream = await open_tunnel(addresses, site, nginx_h2.port, ["h2"])
        async with stream:
            alpn = stream.extra(TLSAttribute.alpn_protocol)  # noqa: S610
            status, body = await h2_get(
                stream, f"localhost:{nginx_h2.port}", "/subject"
            )
    assert alpn == "h2"
    assert status == 200
    assert body == b"subject=CN=proxy client\n"


async def test_sni_names_upstream_for_ip_connect(
    site: Site, running: tuple[Proxy, ProxyAddresses]
) -> None:
    # The upstream certificate has no IP address, so only a check against
    # the client's SNI (not the CONNECT host) can pass.
    named_only = issue(site.upstream_ca, "localhost", dns_names=("localhost",))
    key, cert = named_only.write(site.directory, "named-only")
    _, addresses = running
    with (
        start_nginx(
            site.directory, cert, key, site.path("client-ca.crt"), http2=True
        ) as peer,
        anyio.fail_after(REQUEST_TIMEOUT_SECONDS),
    ):
        stream = await open_tunnel(addresses, site, peer.port, ["h2"], host="127.0.0.1")
        async with stream:
            status, body = await h2_get(stream, f"localhost:{peer.port}", "/subject")
    assert status == 200
    assert body == b"subject=CN=proxy client\n"


async def test_untrusted_upstream_error_leaf(
    site: Site, stranger_h2: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    proxy, addresses = running
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        stream = await open_tunnel(
            addresses, site, stranger_h2.port, ["h2", "http/1.1"]
        )
        async with stream:
            alpn = stream.extra(TLSAttribute.alpn_protocol)  # noqa: S610
            der = stream.extra(TLSAttribute.peer_certificate_binary)  # noqa: S610
            await stream.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = await read_to_end(stream)
    assert alpn == "http/1.1"
    assert response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"certificate verify failed" in response
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["localhost"]
    lifetime = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert lifetime <= ERROR_LEAF_LIFETIME
    assert proxy.minter is not None
    assert proxy.minter.mint_count == 0
    assert proxy.counts().minted_error_certificates == 1


async def test_untrusted_upstream_alerts_h2_only(
    site: Site, stranger_h2: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    proxy, addresses = running
    with (
        anyio.fail_after(REQUEST_TIMEOUT_SECONDS),
        pytest.raises(ssl.SSLError, match="ALERT_UNKNOWN_CA"),
    ):
        await open_tunnel(addresses, site, stranger_h2.port, ["h2"])
    counts = proxy.counts()
    assert counts.minted_certificates == 0
    assert counts.minted_error_certificates == 0


async def test_plain_http_in_tunnel_closes(
    site: Site,
    nginx_h2: Peer,
    running: tuple[Proxy, ProxyAddresses],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, addresses = running
    request = f"CONNECT localhost:{nginx_h2.port} HTTP/1.1\r\n\r\n".encode()
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        async with await anyio.connect_tcp(*proxy_address(addresses)) as stream:
            await stream.send(request + b"GET / HTTP/1.1\r\n\r\n")
            response = await read_to_end(stream)
    assert response == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert "Client did not start TLS in the tunnel" in caplog.text
    assert nginx_h2.access_log() == []


async def test_malformed_hello_gets_decode_error(
    site: Site, nginx_h2: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    proxy, addresses = running
    request = f"CONNECT localhost:{nginx_h2.port} HTTP/1.1\r\n\r\n".encode()
    # A handshake record that carries a ServerHello header instead.
    server_hello = b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        async with await anyio.connect_tcp(*proxy_address(addresses)) as stream:
            await stream.send(request + server_hello)
            response = await read_to_end(stream)
    established = b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert response == established + alert_record(AlertDescription.decode_error)
    assert proxy.counts().tunnels.failed == 1


async def test_silent_client_times_out(
    site: Site,
    nginx_h2: Peer,
    running: tuple[Proxy, ProxyAddresses],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tunnel, "CLIENT_HELLO_TIMEOUT_SECONDS", 0.2)
    caplog.set_level(logging.INFO, logger=tunnel.__name__)
    proxy, addresses = running
    request = f"CONNECT localhost:{nginx_h2.port} HTTP/1.1\r\n\r\n".encode()
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        async with await anyio.connect_tcp(*proxy_address(addresses)) as stream:
            await stream.send(request)
            response = await read_to_end(stream)
    assert response == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert "Client sent no ClientHello in time" in caplog.text
    assert proxy.counts().tunnels.failed == 1
