"""Failures after the 200: a CA Signer that fails or hangs, a client reset."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest
from peers import Peer
from proxy_site import (
    REQUEST_TIMEOUT_SECONDS,
    Site,
    curl_through,
    nginx,
    serving,
    site,
)

from kmsproxy import Proxy, ProxyAddresses
from kmsproxy.proxy import tunnel
from kmsproxy.signer import SignatureScheme, SoftwareSigner

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Fixtures shared through proxy_site.
__all__ = ["nginx", "site"]

# Seconds a hanging Signer waits; far beyond the test's mint timeout.
HANG_SECONDS = 3600.0

# The mint timeout used in the hang test, so it finishes quickly.
SHORT_MINT_TIMEOUT_SECONDS = 0.5

# Pause between two looks at the captured log while waiting for a line.
LOG_POLL_SECONDS = 0.02

# curl's exit status when the TLS handshake fails, here on the proxy's alert.
CURL_SSL_CONNECT_ERROR = 35


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class BrokenCASigner(SoftwareSigner):
    """A CA key that fails or hangs on every signature, as a dead device does."""

    def __init__(self, site: Site, mode: str) -> None:
        super().__init__(site.local_ca.key, "broken-ca")
        self.mode = mode

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        if self.mode == "raise":
            raise RuntimeError("device unplugged")
        await anyio.sleep(HANG_SECONDS)
        return await super().sign(data, scheme)


@contextlib.asynccontextmanager
async def serve_with(
    site: Site, mode: str
) -> AsyncIterator[tuple[Proxy, ProxyAddresses]]:
    proxy = Proxy(site.config(ca_key=BrokenCASigner(site, mode)))
    async with serving(proxy) as addresses:
        yield proxy, addresses


async def fetch(site: Site, addresses: ProxyAddresses, port: int) -> bytes:
    result = await curl_through(
        addresses.proxy_url,
        site,
        "--write-out",
        "status=%{http_code}",
        f"https://127.0.0.1:{port}/subject",
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


async def fetch_status(site: Site, addresses: ProxyAddresses, port: int) -> int:
    """Run curl through the proxy; return its exit status."""
    result = await curl_through(
        addresses.proxy_url,
        site,
        f"https://127.0.0.1:{port}/subject",
    )
    return result.returncode


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_signer_error_sends_alert(
    site: Site, nginx: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve_with(site, "raise") as (_, addresses):
        status = await fetch_status(site, addresses, nginx.port)
    assert status == CURL_SSL_CONNECT_ERROR
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    warnings = warnings_in(caplog)
    assert any(
        "Minting failed target=127.0.0.1:" in m and "device unplugged" in m
        for m in warnings
    ), warnings


async def test_hung_signer_times_out(
    site: Site,
    nginx: Peer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tunnel, "MINT_TIMEOUT_SECONDS", SHORT_MINT_TIMEOUT_SECONDS)
    async with serve_with(site, "hang") as (_, addresses):
        # The second CONNECT must not wait behind the first one's lock.
        first = await fetch_status(site, addresses, nginx.port)
        second = await fetch_status(site, addresses, nginx.port)
    assert first == CURL_SSL_CONNECT_ERROR
    assert second == CURL_SSL_CONNECT_ERROR
    warnings = warnings_in(caplog)
    assert any("timed out after 0.5 s" in m for m in warnings), warnings
    # The hung key is not asked again for an error-page leaf.
    assert not any("error-page certificate" in m for m in warnings), warnings


def test_unexpected_error_names_type() -> None:
    reason = tunnel.describe_mint_error(ValueError("bad name"), 1.0)
    assert reason == "ValueError: bad name"


async def test_client_reset_after_connect(
    site: Site, nginx: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve_with(site, "raise") as (_, addresses):
        address = addresses.proxy[0]
        with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
            client = await anyio.connect_tcp(address.host, address.port)
            raw = client.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
            # SO_LINGER with a zero timeout turns close() into a TCP reset.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.send(
                f"CONNECT 127.0.0.1:{nginx.port} HTTP/1.1\r\n\r\n".encode()
            )
            await client.aclose()
            # Wait until the proxy has handled the reset, then check how.
            while not any(
                r.getMessage().startswith("Client left") for r in caplog.records
            ):
                await anyio.sleep(LOG_POLL_SECONDS)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


class BrokenClientSigner(SoftwareSigner):
    """A client key whose device fails on every signature."""

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        raise RuntimeError("client key unplugged")


async def test_client_signer_error_is_502(
    site: Site, nginx: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    signer = BrokenClientSigner(site.client.key, "broken-client")
    proxy = Proxy(site.config(client_keys=[signer]))
    async with serving(proxy) as addresses:
        output = await fetch(site, addresses, nginx.port)
    assert output.endswith(b"status=502")
    assert b"client key unplugged" in output
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
