"""The proxy under test, in process, and the files it runs with.

A `Site` is one proxy setup written under a test's tmp_path: a local CA,
a client identity, and an upstream CA with a server leaf for nginx or
s_server. `serving` runs a `Proxy` in the caller's event loop, and
`nginx_for` starts nginx with the site's upstream leaf, requiring the
site's client certificate. The `site`, `nginx` and `running` fixtures are
meant to be imported by the test modules that use them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from peers import Peer, start_nginx
from pki import Issued, issue, make_ca

from kmsproxy import Proxy, ProxyAddresses, ProxyConfig

# Upper bound for one request through the proxy; loopback takes milliseconds.
REQUEST_TIMEOUT_SECONDS = 20.0


@dataclass
class Site:
    """Files for one proxy setup: local CA, client identity, upstream CA."""

    directory: Path
    local_ca: Issued
    upstream_ca: Issued
    client_ca: Issued
    client: Issued

    def path(self, name: str) -> Path:
        return self.directory / name

    def config(self, **overrides: object) -> ProxyConfig:
        settings: dict[str, object] = {
            "ca_key": self.path("ca.key"),
            "ca_certificate": self.path("ca.crt"),
            "client_keys": [self.path("client.key")],
            "client_certificates": [self.path("client.crt")],
            "trust": [self.path("upstream-ca.crt")],
            "include_system_trust": False,
            "listen": "127.0.0.1:0",
            "pac_listen": None,
            "handle_signals": False,
        }
        settings.update(overrides)
        return ProxyConfig(**settings)  # type: ignore[arg-type]


def make_site(tmp_path: Path) -> Site:
    """Write a local CA, a client identity and an upstream server leaf."""
    local_ca = make_ca("kmsproxy test local CA")
    upstream_ca = make_ca("upstream CA")
    client_ca = make_ca("client CA")
    client = issue(client_ca, "proxy client", client=True)
    local_ca.write(tmp_path, "ca")
    client.write(tmp_path, "client")
    (tmp_path / "upstream-ca.crt").write_bytes(upstream_ca.chain_pem())
    (tmp_path / "client-ca.crt").write_bytes(client_ca.chain_pem())
    server = issue(
        upstream_ca, "localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",)
    )
    server.write(tmp_path, "server")
    return Site(tmp_path, local_ca, upstream_ca, client_ca, client)


@contextlib.asynccontextmanager
async def serving(proxy: Proxy) -> AsyncIterator[ProxyAddresses]:
    """Run `proxy` in a task group, yield its bound addresses, then stop it."""
    async with anyio.create_task_group() as group:
        addresses = await group.start(proxy.serve)
        try:
            yield addresses
        finally:
            group.cancel_scope.cancel()


def nginx_for(
    site: Site, *, http2: bool = False, name: str = "nginx", extra: str = ""
) -> Peer:
    """Start nginx with the site's upstream leaf, requiring its client CA.

    The returned `Peer` is a context manager that stops nginx by PID.
    """
    return start_nginx(
        site.directory,
        site.path("server.crt"),
        site.path("server.key"),
        site.path("client-ca.crt"),
        http2=http2,
        name=name,
        extra=extra,
    )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


@pytest.fixture
def nginx(site: Site) -> Iterator[Peer]:
    with nginx_for(site) as peer:
        yield peer


@pytest.fixture
async def running(site: Site) -> AsyncIterator[tuple[Proxy, ProxyAddresses]]:
    proxy = Proxy(site.config())
    async with serving(proxy) as addresses:
        yield proxy, addresses


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    if shutil.which("curl") is None:
        pytest.fail("curl not found on PATH (install the Debian package curl)")
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        return await anyio.run_process(
            ["curl", "--silent", "--show-error", "--max-time", "10", *args],
            check=False,
        )


async def curl_through(
    proxy_url: str, site: Site, *args: str
) -> subprocess.CompletedProcess[bytes]:
    """Run curl through the proxy at `proxy_url`, trusting the site's local CA
    for the minted upstream leaf. `args` follow, ending with the URL."""
    return await curl("--proxy", proxy_url, "--cacert", str(site.path("ca.crt")), *args)


async def exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data` to the proxy and read until it closes the connection."""
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        async with await anyio.connect_tcp(*address) as stream:
            await stream.send(data)
            chunks = []
            while True:
                try:
                    chunks.append(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def proxy_address(addresses: ProxyAddresses) -> tuple[str, int]:
    return addresses.proxy[0].host, addresses.proxy[0].port


def renew(site: Site, common_name: str) -> None:
    """Rename-replace client.crt with a new certificate for the same key."""
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(site.client_ca.cert.subject)
        .public_key(site.client.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                site.client_ca.key.public_key()
            ),
            critical=False,
        )
        .sign(site.client_ca.key, hashes.SHA256())
    )
    temporary = site.path("client.crt.new")
    temporary.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    os.replace(temporary, site.path("client.crt"))


async def wait_for_identity(proxy: Proxy, subject: str) -> None:
    assert proxy.identity_store is not None
    with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
        while proxy.identity_store.identities[0].subject != subject:
            await anyio.sleep(0.02)
