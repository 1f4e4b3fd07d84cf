"""The proxy end to end with keys in swtpm: client key, CA key, recovery.

nginx requires a client certificate and has session tickets off, so every
tunnel runs a full handshake and signs with the TPM key.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from peers import Peer, free_port
from pki import certify
from proxy_site import REQUEST_TIMEOUT_SECONDS, Site, curl, nginx_for, site
from proxy_site import serving as serve_proxy
from swtpm_emulator import Swtpm, swtpm_module
from test_proxy import anyio_backend
from tpm_testkeys import (
    create_ca_certificate,
    create_key,
    key_directory,
    transient_handles,
)

from kmsproxy import Proxy, ProxyAddresses
from kmsproxy.cli import main
from kmsproxy_tpm.device import TPMDevice
from kmsproxy_tpm.keyblob import read_key_file

__all__ = ["anyio_backend", "key_directory", "site", "swtpm_module"]

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Bound on waiting for the proxy to recover after swtpm comes back: the
# tpm-reconnect backoff's first delays are 0.5 s and 1 s.
RECOVERY_TIMEOUT_SECONDS = 20.0

# Pause between requests while waiting for recovery.
RECOVERY_POLL_SECONDS = 0.2

# Bound on `kmsproxy serve` starting to listen; it opens two TPM keys.
SERVE_READY_TIMEOUT_SECONDS = 20.0

# Bound on `kmsproxy serve` exiting after SIGTERM.
SERVE_STOP_TIMEOUT_SECONDS = 10.0

# Pause between probes of the proxy's port.
SERVE_POLL_SECONDS = 0.05

NGINX_NO_RESUMPTION = "ssl_session_tickets off;"


@pytest.fixture
def nginx(site: Site) -> Iterator[Peer]:
    with nginx_for(site, extra=NGINX_NO_RESUMPTION) as peer:
        yield peer


def tpm_client_identity(swtpm: Swtpm, site: Site, key_directory: Path) -> str:
    """Create a TPM client key, certify it, store its chain; return its URI."""
    uri = create_key(swtpm, "client")
    public_key = read_key_file(key_directory / "client.pem").public_key
    leaf = certify(site.client_ca, "tpm client", public_key, client=True)
    chain = site.path("tpm-client.crt")
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    assert main(["tpm", "import-cert", "client", str(chain)]) == 0
    return uri


@asynccontextmanager
async def serving(site: Site, **overrides: Any) -> AsyncIterator[ProxyAddresses]:
    async with serve_proxy(Proxy(site.config(**overrides))) as addresses:
        yield addresses


async def fetch(
    addresses: ProxyAddresses, ca_certificate: Path, url: str
) -> subprocess.CompletedProcess[bytes]:
    return await curl(
        "--proxy",
        addresses.proxy_url,
        "--cacert",
        str(ca_certificate),
        "--write-out",
        "\nstatus=%{http_code}",
        url,
    )


async def test_client_key_in_tpm_reaches_nginx(
    swtpm_module: Swtpm, key_directory: Path, site: Site, nginx: Peer
) -> None:
    uri = tpm_client_identity(swtpm_module, site, key_directory)
    async with serving(site, client_keys=[uri], client_certificates=[uri]) as addresses:
        result = await fetch(
            addresses, site.path("ca.crt"), f"https://localhost:{nginx.port}/subject"
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=tpm client\n\nstatus=200"
    assert nginx.client_subjects() == ["CN=tpm client"]


async def test_rsa_client_key_in_tpm_reaches_nginx(
    swtpm_module: Swtpm, key_directory: Path, site: Site, nginx: Peer
) -> None:
    uri = create_key(swtpm_module, "client", "--kty", "RSA")
    public_key = read_key_file(key_directory / "client.pem").public_key
    leaf = certify(site.client_ca, "tpm rsa client", public_key, client=True)
    chain = site.path("tpm-client.crt")
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    async with serving(
        site, client_keys=[uri], client_certificates=[chain]
    ) as addresses:
        result = await fetch(
            addresses, site.path("ca.crt"), f"https://localhost:{nginx.port}/subject"
        )
    assert result.stdout == b"subject=CN=tpm rsa client\n\nstatus=200"


async def test_ca_key_in_tpm_mints_leaves(
    swtpm_module: Swtpm, key_directory: Path, site: Site, nginx: Peer
) -> None:
    client_uri = tpm_client_identity(swtpm_module, site, key_directory)
    ca_uri = create_key(swtpm_module, "ca")
    ca_path = await create_ca_certificate(ca_uri, site.path("tpm-ca"))
    async with serving(
        site,
        ca_key=ca_uri,
        ca_certificate=ca_path,
        client_keys=[client_uri],
        client_certificates=[client_uri],
    ) as addresses:
        # curl trusts only the TPM CA, so it accepts the minted leaf only if
        # the TPM key signed it.
        result = await fetch(
            addresses, ca_path, f"https://localhost:{nginx.port}/subject"
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=tpm client\n\nstatus=200"


class CallMeter:
    """Count TPM calls and the most that ran at the same moment."""

    def __init__(self) -> None:
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def wrap(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def measured(device: TPMDevice, function: Callable[..., Any]) -> Any:
            with self._lock:
                self.calls += 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                # Hold the call a little, so overlapping calls would show.
                time.sleep(0.01)
                return call(device, function)
            finally:
                with self._lock:
                    self.active -= 1

        return measured


async def test_concurrent_tunnels_share_one_tpm(
    swtpm_module: Swtpm,
    key_directory: Path,
    site: Site,
    nginx: Peer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = tpm_client_identity(swtpm_module, site, key_directory)
    meter = CallMeter()
    monkeypatch.setattr(TPMDevice, "call", meter.wrap(TPMDevice.call))
    results: list[bytes] = []
    async with serving(site, client_keys=[uri], client_certificates=[uri]) as addresses:
        calls_at_start = meter.calls

        async def one() -> None:
            result = await fetch(
                addresses, site.path("ca.crt"), f"https://localhost:{nginx.port}/"
            )
            results.append(result.stdout)

        with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
            async with anyio.create_task_group() as group:
                for _ in range(6):
                    group.start_soon(one)
    assert results == [b"hello from nginx\n\nstatus=200"] * 6
    assert meter.calls - calls_at_start >= 6
    assert meter.max_active == 1


async def test_proxy_recovers_after_swtpm_restart(
    swtpm_module: Swtpm,
    key_directory: Path,
    site: Site,
    nginx: Peer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = tpm_client_identity(swtpm_module, site, key_directory)
    url = f"https://localhost:{nginx.port}/subject"
    async with serving(site, client_keys=[uri], client_certificates=[uri]) as addresses:
        before = await fetch(addresses, site.path("ca.crt"), url)
        swtpm_module.kill()
        try:
            during = await fetch(addresses, site.path("ca.crt"), url)
        finally:
            swtpm_module.restart()
        after = await fetch_until_ok(addresses, site.path("ca.crt"), url)
    assert before.stdout.endswith(b"status=200")
    assert during.stdout.endswith(b"status=502")
    assert b"cannot talk to the TPM" in during.stdout
    assert during.stdout.count(b"tpmkms:") == 1
    assert b"tpm-reconnect" in during.stdout
    assert after.stdout == b"subject=CN=tpm client\n\nstatus=200"
    assert caplog.text.count("store unavailable: TPM swtpm:") == 1
    assert caplog.text.count("store available again: TPM swtpm:") == 1


async def fetch_until_ok(
    addresses: ProxyAddresses, ca_certificate: Path, url: str
) -> subprocess.CompletedProcess[bytes]:
    """Repeat a request until it returns 200, bounded in time."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_SECONDS
    while True:
        result = await fetch(addresses, ca_certificate, url)
        if result.stdout.endswith(b"status=200") or time.monotonic() > deadline:
            return result
        await anyio.sleep(RECOVERY_POLL_SECONDS)


def wait_for_port(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Wait (bounded) until `kmsproxy serve` accepts TCP on `port`."""
    deadline = time.monotonic() + SERVE_READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"kmsproxy serve exited early:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(SERVE_POLL_SECONDS)
    pytest.fail(f"kmsproxy serve did not listen in time:\n{log.read_text()}")


@contextmanager
def running_serve(
    site: Site, arguments: list[str], environment: dict[str, str] | None = None
) -> Iterator[int]:
    """Run `kmsproxy serve ARGUMENTS` on free loopback ports; yield its port.

    On leaving, stop it by PID with SIGTERM and check that it exits with 0;
    kill it if it is still running.
    """
    port = free_port()
    log = site.path("serve.log")
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kmsproxy",
                "serve",
                *arguments,
                "--trust",
                str(site.path("upstream-ca.crt")),
                "--listen",
                f"127.0.0.1:{port}",
                "--pac-listen",
                f"127.0.0.1:{free_port()}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(environment or {})},
        )
    try:
        wait_for_port(process, port, log)
        yield port
        process.terminate()
        status = process.wait(timeout=SERVE_STOP_TIMEOUT_SECONDS)
        assert status == 0, f"kmsproxy serve exited with {status}:\n{log.read_text()}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=SERVE_STOP_TIMEOUT_SECONDS)


async def fetch_through_serve(
    site: Site,
    arguments: list[str],
    ca_certificate: Path,
    url: str,
    environment: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """Fetch `url` through `kmsproxy serve ARGUMENTS`; return curl's result
    and the serve log."""
    with running_serve(site, arguments, environment) as port:
        result = await curl(
            "--proxy", f"http://127.0.0.1:{port}", "--cacert", str(ca_certificate), url
        )
    return result, site.path("serve.log").read_text()


async def test_cli_serve_with_tpm_keys(
    swtpm_module: Swtpm, key_directory: Path, site: Site, nginx: Peer
) -> None:
    client_uri = tpm_client_identity(swtpm_module, site, key_directory)
    ca_uri = create_key(swtpm_module, "ca")
    ca_path = await create_ca_certificate(ca_uri, site.path("tpm-ca"))
    # Stored beside the CA key, the certificate is read through the same URI.
    assert main(["tpm", "import-cert", "ca", str(ca_path)]) == 0
    arguments = [ca_uri, ca_uri, "--clientkey", client_uri, "--clientcert", client_uri]
    url = f"https://localhost:{nginx.port}/subject"
    result, log = await fetch_through_serve(site, arguments, ca_path, url)
    assert result.returncode == 0, log
    assert result.stdout == b"subject=CN=tpm client\n"


def test_cli_serve_missing_key_is_one_line(
    swtpm_module: Swtpm, key_directory: Path, site: Site
) -> None:
    uri = f"tpmkms:name=absent;tcti={swtpm_module.tcti}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kmsproxy",
            "serve",
            str(site.path("ca.key")),
            str(site.path("ca.crt")),
            "--clientkey",
            uri,
            "--clientcert",
            str(site.path("client.crt")),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--pac-listen",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=SERVE_READY_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"kmsproxy: error: {uri}: key file ")
    assert last_line.endswith("`kmsproxy tpm create` makes one")


async def test_cli_csr_while_serve_runs(
    swtpm_module: Swtpm,
    key_directory: Path,
    site: Site,
    nginx: Peer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client_uri = tpm_client_identity(swtpm_module, site, key_directory)
    ca_uri = create_key(swtpm_module, "ca")
    ca_path = await create_ca_certificate(ca_uri, site.path("tpm-ca"))
    arguments = [ca_uri, str(ca_path), "--clientkey", client_uri]
    arguments += ["--clientcert", client_uri]
    url = f"https://localhost:{nginx.port}/subject"
    capsys.readouterr()
    with running_serve(site, arguments) as port:
        loaded_while_idle = transient_handles(swtpm_module)
        # A renewal: a new request for the client key while serve uses it.
        status = await anyio.to_thread.run_sync(
            main, ["csr", client_uri, "--subject", "CN=tpm client"]
        )
        result = await curl(
            "--proxy", f"http://127.0.0.1:{port}", "--cacert", str(ca_path), url
        )
    request = capsys.readouterr().out
    assert loaded_while_idle == []
    assert status == 0
    assert request.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert result.stdout == b"subject=CN=tpm client\n"
    assert transient_handles(swtpm_module) == []
