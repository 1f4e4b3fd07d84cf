"""An upstream whose certificate the trust store cannot reach.

The 502 page names what is wrong (the issuer that is not trusted, or a
self-signed certificate) and the fix (`--trust FILE`), for the two setups a
new user meets first: `openssl req -x509` and a CA of their own.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import anyio
import pytest
from peers import Peer, start_openssl_server
from pki import issue, make_ca
from proxy_site import Site, curl, site
from test_proxy import anyio_backend

from kmsproxy import Proxy

__all__ = ["anyio_backend", "site"]

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Bound for `openssl req` to write a key and certificate.
OPENSSL_TIMEOUT_SECONDS = 30.0


def self_signed(directory: Path) -> tuple[Path, Path]:
    """Make a server certificate as `openssl req -x509` users do."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found on PATH (install the Debian package openssl)")
    key, cert = directory / "self.key", directory / "self.crt"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=OPENSSL_TIMEOUT_SECONDS,
    )  # fmt: skip
    return cert, key


async def fetch_through(site: Site, peer: Peer) -> bytes:
    proxy = Proxy(site.config())
    async with anyio.create_task_group() as group:
        addresses = await group.start(proxy.serve)
        result = await curl(
            "--proxy", addresses.proxy_url,
            "--cacert", str(site.path("ca.crt")),
            "--write-out", "\nstatus=%{http_code}",
            f"https://localhost:{peer.port}/",
        )  # fmt: skip
        group.cancel_scope.cancel()
    return result.stdout


async def test_self_signed_upstream_names_fix(site: Site, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with start_openssl_server(tmp_path, cert, key, require_client_cert=False) as peer:
        page = await fetch_through(site, peer)
    assert page.endswith(b"status=502")
    assert b"certificate not trusted: 'CN=localhost' is self-signed" in page
    assert b"--trust FILE" in page
    assert b"max depth" not in page


async def test_untrusted_ca_upstream_names_issuer(site: Site, tmp_path: Path) -> None:
    own_ca = make_ca("newcomer test CA")
    server = issue(own_ca, "localhost", dns_names=("localhost",))
    key, cert = server.write(tmp_path, "server")
    with start_openssl_server(tmp_path, cert, key, require_client_cert=False) as peer:
        page = await fetch_through(site, peer)
    assert page.endswith(b"status=502")
    assert b"certificate not trusted: issuer 'CN=newcomer test CA'" in page
    assert b"--trust FILE" in page
