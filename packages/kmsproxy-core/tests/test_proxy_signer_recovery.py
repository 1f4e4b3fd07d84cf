"""A key store that fails with `SignerError`, then comes back, without a restart.

Backends raise `SignerError` when a token is removed or a device stops
responding. The client key's error reaches the client as a 502 page that
names the key URI (redacted) and the reason. The CA key's error ends the
client's handshake with an alert and a WARNING that names the key. Once
the store responds again, the next CONNECT succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from peers import Peer, start_openssl_server
from proxy_site import Site, curl, nginx, serving, site

from kmsproxy import Proxy
from kmsproxy.signer import PrivateKey, SignatureScheme, SignerError, SoftwareSigner
from kmsproxy.uri import KeyURI

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Fixtures shared through proxy_site.
__all__ = ["nginx", "site"]

# A URI with a PIN, as a PKCS#11 user might give it; the PIN must not leak.
CLIENT_KEY_URI = "pkcs11:token=dev;object=client?pin-value=123456"
PIN = "123456"

CA_KEY_URI = "pkcs11:token=ca;object=ca"

# curl's exit status when the TLS handshake fails, here on the proxy's alert.
CURL_SSL_CONNECT_ERROR = 35


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RemovableTokenSigner(SoftwareSigner):
    """A key on a token that can be pulled out and put back."""

    def __init__(self, private_key: PrivateKey, uri: str) -> None:
        super().__init__(private_key, uri)
        self.present = False
        self.attempts = 0

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        self.attempts += 1
        if not self.present:
            raise SignerError(f"{self.uri}: token not present; insert it")
        return await super().sign(data, scheme)


@pytest.fixture
def s_server12(site: Site) -> Iterator[Peer]:
    """Start `openssl s_server -tls1_2 -www`, requiring a client certificate."""
    with start_openssl_server(
        site.directory,
        site.path("server.crt"),
        site.path("server.key"),
        site.path("client-ca.crt"),
        protocol="-tls1_2",
        name="s_server12",
    ) as peer:
        yield peer


async def fetch(
    site: Site, proxy_url: str, port: int, *arguments: str
) -> tuple[int, bytes]:
    """GET /subject through the proxy; return curl's exit status and output."""
    result = await curl(
        *arguments,
        "--proxy",
        proxy_url,
        "--cacert",
        str(site.path("ca.crt")),
        "--write-out",
        "\nstatus=%{http_code}",
        f"https://127.0.0.1:{port}/subject",
    )
    return result.returncode, result.stdout


async def fetch_removed_then_back(
    proxy: Proxy, site: Site, token: RemovableTokenSigner, port: int
) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    """Fetch through `proxy` with `token` removed, then again with it back.
    Return both results of `fetch`."""
    async with serving(proxy) as addresses:
        removed = await fetch(site, addresses.proxy_url, port)
        token.present = True
        back = await fetch(site, addresses.proxy_url, port)
    return removed, back


async def test_client_token_removed_then_back(
    site: Site, nginx: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    redacted = KeyURI.parse(CLIENT_KEY_URI).redacted()
    signer = RemovableTokenSigner(site.client.key, redacted)
    proxy = Proxy(site.config(client_keys=[signer]))
    removed, back = await fetch_removed_then_back(proxy, site, signer, nginx.port)
    failed_status, failed = removed
    status, output = back

    assert failed_status == 0
    assert failed.endswith(b"status=502")
    assert signer.attempts >= 1
    assert failed.count(redacted.encode()) == 1
    assert b"token not present" in failed
    assert PIN.encode() not in failed

    assert status == 0
    assert output == b"subject=CN=proxy client\n\nstatus=200"
    assert nginx.client_subjects()[-1:] == ["CN=proxy client"]

    messages = [r.getMessage() for r in caplog.records]
    assert not any(PIN in m for m in messages)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_client_token_back_tls12(site: Site, s_server12: Peer) -> None:
    redacted = KeyURI.parse(CLIENT_KEY_URI).redacted()
    signer = RemovableTokenSigner(site.client.key, redacted)
    proxy = Proxy(site.config(client_keys=[signer]))
    removed, back = await fetch_removed_then_back(proxy, site, signer, s_server12.port)
    failed_status, failed = removed
    status, output = back

    assert failed_status == 0
    assert failed.endswith(b"status=502")
    assert failed.count(redacted.encode()) == 1
    assert b"token not present" in failed
    assert PIN.encode() not in failed

    assert status == 0
    assert output.endswith(b"status=200")
    # s_server -www reports the protocol of the connection it served.
    assert b"TLSv1.2" in output


async def test_ca_token_removed_then_back(
    site: Site, nginx: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ca_signer = RemovableTokenSigner(site.local_ca.key, CA_KEY_URI)
    proxy = Proxy(site.config(ca_key=ca_signer))
    removed, back = await fetch_removed_then_back(proxy, site, ca_signer, nginx.port)
    failed_status, _ = removed
    status, output = back

    assert failed_status == CURL_SSL_CONNECT_ERROR
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "Minting failed target=127.0.0.1:" in m
        and f"{CA_KEY_URI}: token not present" in m
        for m in warnings
    ), warnings

    assert status == 0
    assert output == b"subject=CN=proxy client\n\nstatus=200"


async def test_ca_token_removed_listener_tls(
    site: Site, nginx: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    # With an https:// proxy URL, the proxy's own leaf needs the CA key too.
    caplog.set_level(logging.INFO)
    ca_signer = RemovableTokenSigner(site.local_ca.key, CA_KEY_URI)
    proxy = Proxy(site.config(ca_key=ca_signer))
    async with serving(proxy) as addresses:
        address = addresses.proxy[0]
        proxy_url = f"https://{address.host}:{address.port}"
        arguments = ["--proxy-cacert", str(site.path("ca.crt"))]
        failed = await fetch(site, proxy_url, nginx.port, *arguments)
        ca_signer.present = True
        status, output = await fetch(site, proxy_url, nginx.port, *arguments)

    assert failed[0] != 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        m.startswith("Listener certificate not minted")
        and f"{CA_KEY_URI}: token not present" in m
        for m in warnings
    ), warnings
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []

    assert status == 0
    assert output == b"subject=CN=proxy client\n\nstatus=200"
