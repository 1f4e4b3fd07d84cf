"""Guards in front of the tunnel: loops, stalled TLS, exposed listeners."""

from __future__ import annotations

import datetime
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from proxy_site import Site, exchange, make_site, status_of

from kmsproxy import Proxy, ProxyAddresses
from kmsproxy.proxy.listener import ListenAddress
from kmsproxy.proxy.server import warn_if_exposed
from kmsproxy.signer import PrivateKey

# A head timeout short enough for a test, far above a loopback round trip.
SHORT_HEAD_TIMEOUT_SECONDS = 0.5

# TLS connections tried against a listener whose certificate cannot be minted.
TLS_ATTEMPTS = 3

# Upper bound for one connection attempt in a test.
STEP_TIMEOUT_SECONDS = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


@pytest.fixture
async def running(site: Site) -> AsyncIterator[ProxyAddresses]:
    proxy = Proxy(site.config(pac_listen="127.0.0.1:0"))
    async with anyio.create_task_group() as group:
        yield await group.start(proxy.serve)
        group.cancel_scope.cancel()


def address_of(addresses: ProxyAddresses) -> tuple[str, int]:
    return addresses.proxy[0].host, addresses.proxy[0].port


@pytest.mark.anyio
async def test_connect_to_self_is_508(running: ProxyAddresses) -> None:
    port = running.proxy[0].port
    response = await exchange(
        address_of(running), f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode()
    )
    assert status_of(response) == 508
    assert b"own listening address" in response


@pytest.mark.anyio
async def test_connect_to_mapped_self_is_508(running: ProxyAddresses) -> None:
    # The IPv6 socket reaches the IPv4 listener through the mapped address.
    port = running.proxy[0].port
    response = await exchange(
        address_of(running),
        f"CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\n\r\n".encode(),
    )
    assert status_of(response) == 508


@pytest.mark.anyio
async def test_connect_to_pac_port_is_508(running: ProxyAddresses) -> None:
    port = running.pac[0].port
    response = await exchange(
        address_of(running), f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode()
    )
    assert status_of(response) == 508


@pytest.mark.anyio
async def test_stalled_tls_gets_no_408(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "kmsproxy.proxy.server.HEAD_TIMEOUT_SECONDS", SHORT_HEAD_TIMEOUT_SECONDS
    )
    async with anyio.create_task_group() as group:
        addresses = await group.start(Proxy(site.config()).serve)
        # One byte of a TLS handshake record header, then nothing.
        response = await exchange(address_of(addresses), b"\x16")
        group.cancel_scope.cancel()
    assert response == b""


@pytest.mark.anyio
async def test_stalled_plain_head_still_408(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "kmsproxy.proxy.server.HEAD_TIMEOUT_SECONDS", SHORT_HEAD_TIMEOUT_SECONDS
    )
    async with anyio.create_task_group() as group:
        addresses = await group.start(Proxy(site.config()).serve)
        response = await exchange(address_of(addresses), b"CONNECT a.test:4")
        group.cancel_scope.cancel()
    assert status_of(response) == 408


def test_wildcard_listen_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    # No socket is bound: the check reads the addresses only.
    warn_if_exposed(ProxyAddresses((ListenAddress("0.0.0.0", 8090),)))  # noqa: S104
    assert "address=0.0.0.0:8090" in caplog.text
    assert "anyone who can reach it" in caplog.text


@pytest.mark.anyio
async def test_loopback_listen_is_quiet(
    running: ProxyAddresses, caplog: pytest.LogCaptureFixture
) -> None:
    assert "non-loopback" not in caplog.text


@pytest.mark.anyio
async def test_pac_file_and_requests_logged(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pac = site.path("proxy.pac")
    pac.write_text("function FindProxyForURL(u, h) { return 'DIRECT'; }\n")
    proxy = Proxy(site.config(pac_listen="127.0.0.1:0", pac_file=pac))
    async with anyio.create_task_group() as group:
        addresses = await group.start(proxy.serve)
        pac_address = (addresses.pac[0].host, addresses.pac[0].port)
        response = await exchange(pac_address, b"GET /proxy.pac HTTP/1.1\r\n\r\n")
        group.cancel_scope.cancel()
    assert status_of(response) == 200
    assert f"file={pac}" in caplog.text
    assert "PAC request method=GET target='/proxy.pac' status=200" in caplog.text


def expired_copy(certificate: x509.Certificate, key: PrivateKey) -> x509.Certificate:
    """Re-sign `certificate` with the same names and key, expired an hour ago."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(certificate.subject)
        .issuer_name(certificate.issuer)
        .public_key(certificate.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(hours=1))
    )
    for extension in certificate.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.anyio
async def test_ca_expired_at_runtime_warns_once(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = Proxy(site.config())
    async with anyio.create_task_group() as group:
        running = await group.start(proxy.serve)
        assert proxy.minter is not None
        # As if the CA certificate had expired while the proxy runs.
        proxy.minter.ca.certificate = expired_copy(
            site.local_ca.cert, site.local_ca.key
        )
        client_context = ssl.create_default_context(cafile=site.path("ca.crt"))
        for _ in range(TLS_ATTEMPTS):
            with (
                anyio.fail_after(STEP_TIMEOUT_SECONDS),
                pytest.raises(
                    (
                        ssl.SSLError,
                        anyio.EndOfStream,
                        anyio.BrokenResourceError,
                        OSError,
                    )
                ),
            ):
                await anyio.connect_tcp(
                    *address_of(running),
                    ssl_context=client_context,
                    tls_standard_compatible=False,
                )
        group.cancel_scope.cancel()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("Listener certificate not minted")
    ]
    assert len(warnings) == 1
    assert "expired" in warnings[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
