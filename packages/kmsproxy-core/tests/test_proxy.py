"""The proxy end to end: curl and raw sockets through it to real upstreams."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from peers import Peer, free_port, start_nginx, start_openssl_server
from pki import issue, make_ca
from proxy_site import (
    REQUEST_TIMEOUT_SECONDS,
    Site,
    curl,
    curl_through,
    exchange,
    nginx,
    proxy_address,
    renew,
    running,
    serving,
    site,
    status_of,
    wait_for_identity,
)

from kmsproxy import Proxy, ProxyAddresses, ProxyConfig
from kmsproxy.cli.demo import (
    create_demo_files,
    fetch_through_proxy,
    serve_mtls_upstream,
    upstream_context,
)
from kmsproxy.proxy import tunnel
from kmsproxy.proxy.connect import MAX_HEAD_BYTES
from kmsproxy.proxy.pac import PAC_MEDIA_TYPE

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# The fixtures come from proxy_site; other test modules import them and the
# helpers from here too.
__all__ = ["nginx", "running", "site"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_curl_http_proxy_reaches_nginx(
    site: Site, nginx: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    result = await curl_through(
        addresses.proxy_url,
        site,
        f"https://localhost:{nginx.port}/subject",
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=proxy client\n"
    assert nginx.client_subjects() == ["CN=proxy client"]


async def test_curl_https_proxy_reaches_nginx(
    site: Site, nginx: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    _, addresses = running
    host, port = proxy_address(addresses)
    result = await curl_through(
        f"https://{host}:{port}",
        site,
        "--proxy-cacert",
        str(site.path("ca.crt")),
        f"https://127.0.0.1:{nginx.port}/subject",
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=proxy client\n"


async def test_renewed_certificate_reaches_nginx_twice(
    site: Site, nginx: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    proxy, addresses = running
    url = f"https://localhost:{nginx.port}/subject"
    ca_option = ("--cacert", str(site.path("ca.crt")))
    bodies = []
    for name in ("renewed once", "renewed twice"):
        renew(site, name)
        await wait_for_identity(proxy, f"CN={name}")
        result = await curl("--proxy", addresses.proxy_url, *ca_option, url)
        bodies.append(result.stdout)
    assert bodies == [b"subject=CN=renewed once\n", b"subject=CN=renewed twice\n"]


async def test_concurrent_connects_mint_once(
    site: Site, nginx: Peer, running: tuple[Proxy, ProxyAddresses]
) -> None:
    proxy, addresses = running
    results: list[bytes] = []

    async def fetch() -> None:
        body = await fetch_through_proxy(
            proxy_address(addresses), "127.0.0.1", nginx.port, site.path("ca.crt")
        )
        results.append(body)

    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(fetch)
    assert len(results) == 5
    assert proxy.minter is not None
    assert proxy.minter.mint_count == 1


async def test_untrusted_upstream_is_502_page(
    site: Site, running: tuple[Proxy, ProxyAddresses]
) -> None:
    proxy, addresses = running
    stranger = issue(make_ca("stranger CA"), "localhost", dns_names=("localhost",))
    key, cert = stranger.write(site.directory, "stranger")
    with start_nginx(
        site.directory, cert, key, site.path("client-ca.crt"), name="stranger"
    ) as peer:
        result = await curl_through(
            addresses.proxy_url,
            site,
            "--write-out",
            "status=%{http_code}",
            f"https://localhost:{peer.port}/subject",
        )
    assert result.returncode == 0, result.stderr.decode()
    assert b"certificate verify failed" in result.stdout
    assert result.stdout.endswith(b"status=502")
    assert proxy.minter is not None
    assert proxy.minter.mint_count == 0
    assert proxy.minter.cached_count == 0


async def test_rejected_client_certificate_is_502_page(
    site: Site,
    running: tuple[Proxy, ProxyAddresses],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A wait longer than any scheduling delay, so the alert always arrives
    # within it: the page then comes under the error-page leaf.
    monkeypatch.setattr(tunnel, "REJECTION_WAIT_MIN_SECONDS", REQUEST_TIMEOUT_SECONDS)
    monkeypatch.setattr(tunnel, "REJECTION_WAIT_MAX_SECONDS", REQUEST_TIMEOUT_SECONDS)
    proxy, addresses = running
    other_ca = site.path("other-ca.crt")
    other_ca.write_bytes(make_ca("other client CA").chain_pem())
    with start_openssl_server(
        site.directory,
        site.path("server.crt"),
        site.path("server.key"),
        other_ca,
        extra_args=["-verify_return_error"],
    ) as peer:
        result = await curl_through(
            addresses.proxy_url,
            site,
            "--write-out",
            "status=%{http_code}",
            f"https://localhost:{peer.port}/",
        )
    assert b"server rejected our certificate" in result.stdout
    assert b"unknown_ca" in result.stdout
    assert result.stdout.endswith(b"status=502")
    assert proxy.minter is not None
    assert proxy.minter.mint_count == 0


async def test_insecure_mode_reaches_untrusted_upstream(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = issue(make_ca("stranger CA"), "localhost", dns_names=("localhost",))
    key, cert = stranger.write(site.directory, "stranger")
    proxy = Proxy(site.config(insecure_skip_verify=True))
    with start_nginx(
        site.directory, cert, key, site.path("client-ca.crt"), name="stranger"
    ) as peer:
        async with serving(proxy) as addresses:
            result = await curl_through(
                addresses.proxy_url,
                site,
                f"https://localhost:{peer.port}/subject",
            )
    assert result.stdout == b"subject=CN=proxy client\n"
    assert "NOT verified" in caplog.text


async def test_slow_head_is_408(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kmsproxy.proxy.server.HEAD_TIMEOUT_SECONDS", 0.3)
    async with anyio.create_task_group() as group:
        addresses = await group.start(Proxy(site.config()).serve)
        response = await exchange(proxy_address(addresses), b"CONNECT a.test:4")
        group.cancel_scope.cancel()
    assert status_of(response) == 408


async def test_garbage_is_400(running: tuple[Proxy, ProxyAddresses]) -> None:
    _, addresses = running
    response = await exchange(proxy_address(addresses), b"\x00\xffhello\r\n\r\n")
    assert status_of(response) == 400
    assert b"Connection: close" in response


async def test_get_is_405(running: tuple[Proxy, ProxyAddresses]) -> None:
    _, addresses = running
    request = b"GET http://example.test/ HTTP/1.1\r\nHost: example.test\r\n\r\n"
    response = await exchange(proxy_address(addresses), request)
    assert status_of(response) == 405
    assert b"Allow: CONNECT" in response


async def test_oversized_head_is_431(running: tuple[Proxy, ProxyAddresses]) -> None:
    _, addresses = running
    request = b"CONNECT a.test:443 HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_BYTES
    response = await exchange(proxy_address(addresses), request)
    assert status_of(response) == 431


async def test_unreachable_is_502_refused(
    running: tuple[Proxy, ProxyAddresses],
) -> None:
    _, addresses = running
    closed_port = free_port()
    request = f"CONNECT 127.0.0.1:{closed_port} HTTP/1.1\r\n\r\n".encode()
    response = await exchange(proxy_address(addresses), request)
    assert status_of(response) == 502
    assert b"refused" in response


async def test_localhost_binds_both_loopbacks(site: Site) -> None:
    if not socket.has_ipv6:
        pytest.skip("Python was built without IPv6")
    proxy = Proxy(site.config(listen="localhost:0"))
    async with anyio.create_task_group() as group:
        addresses = await group.start(proxy.serve)
        group.cancel_scope.cancel()
    hosts = sorted(address.host for address in addresses.proxy)
    ports = {address.port for address in addresses.proxy}
    assert hosts == ["127.0.0.1", "::1"]
    assert len(ports) == 1


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_curl_ipv6_literal_upstream(tmp_path: Path) -> None:
    if not has_ipv6_loopback():
        pytest.skip("this machine has no ::1 loopback address")
    files = create_demo_files(tmp_path, "::1")
    config = ProxyConfig(
        ca_key=files.ca_key,
        ca_certificate=files.ca_certificate,
        client_keys=[files.client_key],
        client_certificates=[files.client_certificate],
        trust=[files.upstream_ca],
        include_system_trust=False,
        listen="[::1]:0",
        pac_listen=None,
        handle_signals=False,
    )
    async with anyio.create_task_group() as group:
        upstream_port = await group.start(
            serve_mtls_upstream, "::1", upstream_context(files)
        )
        addresses = await group.start(Proxy(config).serve)
        result = await curl(
            "--proxy",
            addresses.proxy_url,
            "--cacert",
            str(files.ca_certificate),
            f"https://[::1]:{upstream_port}/",
        )
        group.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr.decode()
    assert b"subject=CN=kmsproxy demo client" in result.stdout


@contextlib.asynccontextmanager
async def pac_proxy(site: Site, pac_file: Path | None) -> AsyncIterator[int]:
    proxy = Proxy(site.config(pac_listen="127.0.0.1:0", pac_file=pac_file))
    async with serving(proxy) as addresses:
        yield addresses.pac[0].port


async def test_pac_served_over_tls(site: Site) -> None:
    pac = site.path("proxy.pac")
    pac.write_text('function FindProxyForURL(url, host) { return "PROXY x"; }\n')
    async with pac_proxy(site, pac) as port:
        result = await curl(
            "--include",
            "--cacert",
            str(site.path("ca.crt")),
            f"https://127.0.0.1:{port}/any/path.pac",
        )
        pac.write_text("changed\n")
        changed = await curl(
            "--cacert", str(site.path("ca.crt")), f"https://localhost:{port}/"
        )
    assert result.returncode == 0, result.stderr.decode()
    assert f"Content-Type: {PAC_MEDIA_TYPE}".encode() in result.stdout
    assert result.stdout.endswith(b'return "PROXY x"; }\n')
    assert changed.stdout == b"changed\n"


async def test_pac_missing_is_404(site: Site) -> None:
    async with pac_proxy(site, None) as port:
        result = await curl(
            "--include",
            "--cacert",
            str(site.path("ca.crt")),
            f"https://127.0.0.1:{port}/proxy.pac",
        )
    assert result.stdout.startswith(b"HTTP/1.1 404")
