"""The proxy end to end with keys on a SoftHSM2 token: curl -> kmsproxy -> nginx.

Client keys and their certificates live on one token. The proxy opens both
through `pkcs11:` URIs (the real registry and entry point), and nginx
checks the client certificate. One RSA key allows only CKM_RSA_PKCS, so it
can sign only TLS 1.2's PKCS#1 v1.5 CertificateVerify.
"""

from __future__ import annotations

import contextlib
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from peers import Peer, free_port
from pkcs11 import Mechanism
from pki import certify, issue, make_ca
from proxy_site import Site, curl, make_site, nginx_for
from proxy_site import serving as serve_proxy
from softhsm_token import (
    USER_PIN,
    SoftHSM,
    TokenKeyType,
    activate,
    create_softhsm,
    key_uri,
    self_signed_ca,
)
from test_cli import wait_for_line

from kmsproxy import Proxy, ProxyAddresses
from kmsproxy.cli.demo import serve_mtls_upstream
from kmsproxy.plugins.registry import Registry
from kmsproxy_pkcs11.modules import load_module

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

TOKEN = "proxy"

KEY_IDS: dict[TokenKeyType, bytes] = {
    "p256": b"\x01",
    "p384": b"\x02",
    "rsa2048": b"\x03",
    "rsa3072": b"\x04",
}
PKCS1_ONLY_ID = b"\x05"
CA_ID = b"\x20"

# Bound for the CLI subprocess to stop, and for the wait for recovery.
PROCESS_TIMEOUT_SECONDS = 30.0
RECOVERY_TIMEOUT_SECONDS = 30.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Setup:
    """The module's token, proxy files and nginx."""

    hsm: SoftHSM
    site: Site
    nginx: Peer
    certificates: dict[bytes, x509.Certificate]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    hsm = create_softhsm(tmp_path_factory.mktemp("softhsm"))
    site = make_site(tmp_path_factory.mktemp("site"))
    certificates: dict[bytes, x509.Certificate] = {}
    for active in activate(hsm):
        active.init_token(TOKEN)
        for key_type, object_id in KEY_IDS.items():
            public_key = active.generate_key(TOKEN, key_type, object_id, key_type)
            leaf = certify(site.client_ca, f"token {key_type}", public_key, client=True)
            active.import_certificate(TOKEN, leaf, object_id, key_type)
            certificates[object_id] = leaf
        public_key = active.generate_key(
            TOKEN, "rsa2048", PKCS1_ONLY_ID, "pkcs1", allowed=[Mechanism.RSA_PKCS]
        )
        leaf = certify(site.client_ca, "token pkcs1", public_key, client=True)
        active.import_certificate(TOKEN, leaf, PKCS1_ONLY_ID, "pkcs1")
        active.generate_key(TOKEN, "p256", CA_ID, "ca")
        # Without tickets every handshake signs, so a removed token shows.
        with nginx_for(site, extra="ssl_session_tickets off;") as nginx:
            yield Setup(active, site, nginx, certificates)


@contextlib.asynccontextmanager
async def serving(site: Site, **overrides: object) -> AsyncIterator[ProxyAddresses]:
    async with serve_proxy(Proxy(site.config(**overrides))) as addresses:
        yield addresses


@contextlib.asynccontextmanager
async def serving_key(setup: Setup, object_id: bytes) -> AsyncIterator[ProxyAddresses]:
    """Serve with the token key `object_id` and the certificate beside it."""
    key = key_uri(setup.hsm, TOKEN, object_id)
    certificate = key_uri(setup.hsm, TOKEN, object_id, pin=False)
    async with serving(
        setup.site, client_keys=[key], client_certificates=[certificate]
    ) as addresses:
        yield addresses


async def fetch(addresses: ProxyAddresses, ca: Path, url: str) -> bytes:
    """GET `url` through the proxy; return the body and `status=CODE`."""
    result = await curl(
        "--proxy", addresses.proxy_url, "--cacert", str(ca), "--write-out",
        "\nstatus=%{http_code}", url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


async def fetch_subject(setup: Setup, addresses: ProxyAddresses) -> bytes:
    """GET nginx's /subject through the proxy, trusting the local CA."""
    url = f"https://localhost:{setup.nginx.port}/subject"
    return await fetch(addresses, setup.site.path("ca.crt"), url)


@pytest.mark.parametrize("key_type", list(KEY_IDS))
async def test_token_key_reaches_nginx(setup: Setup, key_type: TokenKeyType) -> None:
    async with serving_key(setup, KEY_IDS[key_type]) as addresses:
        body = await fetch_subject(setup, addresses)
    assert body == f"subject=CN=token {key_type}\n\nstatus=200".encode()


async def test_certificate_file_with_token_key(setup: Setup) -> None:
    chain = setup.site.path("token-p256.crt")
    certificate = setup.certificates[KEY_IDS["p256"]]
    chain.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key = key_uri(setup.hsm, TOKEN, KEY_IDS["p256"])
    async with serving(
        setup.site, client_keys=[key], client_certificates=[chain]
    ) as addresses:
        body = await fetch_subject(setup, addresses)
    assert body == b"subject=CN=token p256\n\nstatus=200"


def tls12_upstream_context(site: Site) -> ssl.SSLContext:
    """An upstream that accepts TLS 1.2 only and requires a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(site.path("server.crt"), site.path("server.key"))
    context.load_verify_locations(site.path("client-ca.crt"))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_pkcs1_only_key_uses_tls12(setup: Setup) -> None:
    async with anyio.create_task_group() as group:
        upstream_port = await group.start(
            serve_mtls_upstream, "127.0.0.1", tls12_upstream_context(setup.site)
        )
        async with serving_key(setup, PKCS1_ONLY_ID) as addresses:
            body = await fetch(
                addresses,
                setup.site.path("ca.crt"),
                f"https://127.0.0.1:{upstream_port}/",
            )
        group.cancel_scope.cancel()
    assert b"client certificate subject=CN=token pkcs1" in body
    assert body.endswith(b"status=200")


async def test_pkcs1_only_key_fails_tls13_nginx(setup: Setup) -> None:
    # nginx here accepts TLS 1.3 only, where RSA needs PSS: the proxy reports
    # the failure as a 502 instead of signing with a scheme the key lacks.
    async with serving_key(setup, PKCS1_ONLY_ID) as addresses:
        body = await fetch_subject(setup, addresses)
    assert b"protocol_version" in body
    assert body.endswith(b"status=502")


async def test_ca_key_on_token_mints_leaves(setup: Setup) -> None:
    ca_uri = key_uri(setup.hsm, TOKEN, CA_ID)
    signer = Registry.load().open_signer(ca_uri)
    try:
        ca_certificate = await self_signed_ca(signer, "kmsproxy token CA")
    finally:
        await signer.aclose()
    ca_path = setup.site.path("token-ca.crt")
    ca_path.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    key = key_uri(setup.hsm, TOKEN, KEY_IDS["p256"])
    async with serving(
        setup.site,
        ca_key=ca_uri,
        ca_certificate=ca_path,
        client_keys=[key],
        client_certificates=[key],
    ) as addresses:
        # curl trusts only the token's CA, so it accepts the minted leaf
        # only if the token key signed it.
        body = await fetch(
            addresses, ca_path, f"https://localhost:{setup.nginx.port}/subject"
        )
    assert body == b"subject=CN=token p256\n\nstatus=200"


async def test_removed_token_is_502_then_recovers(setup: Setup) -> None:
    async with serving_key(setup, KEY_IDS["p256"]) as addresses:
        assert (await fetch_subject(setup, addresses)).endswith(b"status=200")
        aside = setup.hsm.remove_tokens()
        try:
            missing = await fetch_subject(setup, addresses)
        finally:
            setup.hsm.reinsert_tokens(aside)
        recovered = b""
        with anyio.move_on_after(RECOVERY_TIMEOUT_SECONDS):
            while not recovered.endswith(b"status=200"):
                await anyio.sleep(0.2)
                recovered = await fetch_subject(setup, addresses)
    assert b"token not present" in missing
    assert missing.count(b"pkcs11:") == 1
    assert missing.endswith(b"status=502")
    assert recovered == b"subject=CN=token p256\n\nstatus=200"


async def test_cli_serve_recovers_after_removal(setup: Setup, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN + "\n")
    uri = key_uri(setup.hsm, TOKEN, KEY_IDS["rsa2048"], pin=False)
    site, port = setup.site, setup.nginx.port
    proxy_port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "kmsproxy", "serve",
            str(site.path("ca.key")), str(site.path("ca.crt")),
            "--clientkey", f"{uri}?pin-source={pin_file}",
            "--clientcert", uri,
            "--trust", str(site.path("upstream-ca.crt")),
            "--listen", f"127.0.0.1:{proxy_port}", "--pac-listen", "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=setup.hsm.environment(),
    )  # fmt: skip
    try:
        wait_for_line(process, r"Proxy listening")
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        arguments = (
            "--proxy", proxy_url, "--cacert", str(site.path("ca.crt")),
            "--write-out", "\nstatus=%{http_code}", f"https://localhost:{port}/subject",
        )  # fmt: skip
        first = await curl(*arguments)
        aside = setup.hsm.remove_tokens()
        try:
            missing = await curl(*arguments)
            lost = wait_for_line(process, r"store unavailable").string
        finally:
            setup.hsm.reinsert_tokens(aside)
        recovered = b""
        with anyio.move_on_after(RECOVERY_TIMEOUT_SECONDS):
            while not recovered.endswith(b"status=200"):
                await anyio.sleep(0.2)
                recovered = (await curl(*arguments)).stdout
        back = wait_for_line(process, r"store available again").string
    finally:
        stop_cli(process)
    assert first.stdout == b"subject=CN=token rsa2048\n\nstatus=200"
    assert b"token not present" in missing.stdout
    assert missing.stdout.endswith(b"status=502")
    assert "backoff pkcs11-reconnect" in lost
    assert str(pin_file) in lost
    assert USER_PIN not in lost
    assert recovered == b"subject=CN=token rsa2048\n\nstatus=200"
    assert "pkcs11:" in back


async def test_busy_token_holds_only_its_tunnels(setup: Setup, tmp_path: Path) -> None:
    # A second upstream trusts only a file key's CA and sends no CA names,
    # so the proxy signs for it with the file key, listed first. nginx names
    # the client CA, which issued only the token key's certificate.
    file_ca = make_ca("file client CA")
    file_key, file_certificate = issue(file_ca, "file client", client=True).write(
        tmp_path, "file-client"
    )
    file_ca_path = tmp_path / "file-client-ca.crt"
    file_ca_path.write_bytes(file_ca.chain_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(
        setup.site.path("server.crt"), setup.site.path("server.key")
    )
    context.load_verify_locations(file_ca_path)
    context.verify_mode = ssl.CERT_REQUIRED
    token_key = key_uri(setup.hsm, TOKEN, KEY_IDS["p384"])
    ca = setup.site.path("ca.crt")

    # The module's lock, held from a plain thread, is what a signature that
    # waits for a touch holds: every call into the module waits for it.
    module = load_module(setup.hsm.module)
    lock_held, release = threading.Event(), threading.Event()

    def hold_module() -> None:
        with module.lock:
            lock_held.set()
            release.wait(RECOVERY_TIMEOUT_SECONDS)

    holder = threading.Thread(target=hold_module)
    token_done = anyio.Event()
    token_body = b""
    try:
        async with (
            anyio.create_task_group() as group,
            serving(
                setup.site,
                client_keys=[file_key, token_key],
                client_certificates=[file_certificate, token_key],
            ) as addresses,
        ):
            file_port = await group.start(serve_mtls_upstream, "127.0.0.1", context)
            holder.start()
            assert lock_held.wait(RECOVERY_TIMEOUT_SECONDS)

            async def fetch_with_token() -> None:
                nonlocal token_body
                token_body = await fetch_subject(setup, addresses)
                token_done.set()

            group.start_soon(fetch_with_token)
            file_body = await fetch(addresses, ca, f"https://127.0.0.1:{file_port}/")
            token_pending = not token_done.is_set()
            release.set()
            with anyio.fail_after(RECOVERY_TIMEOUT_SECONDS):
                await token_done.wait()
            group.cancel_scope.cancel()
    finally:
        release.set()
        if holder.is_alive():
            holder.join(RECOVERY_TIMEOUT_SECONDS)
    assert b"client certificate subject=CN=file client" in file_body
    assert file_body.endswith(b"status=200")
    assert token_pending
    assert token_body == b"subject=CN=token p384\n\nstatus=200"


def stop_cli(process: subprocess.Popen[str]) -> None:
    """Stop a `kmsproxy serve` subprocess: SIGTERM, then SIGKILL (bounded)."""
    process.terminate()
    try:
        process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=PROCESS_TIMEOUT_SECONDS)


def wait_for_text(path: Path, text: str) -> None:
    """Wait until the file at `path` contains `text` (bounded)."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {path}:\n{path.read_text()}")


async def test_cli_serve_log_hides_pin(setup: Setup, tmp_path: Path) -> None:
    uri = key_uri(setup.hsm, TOKEN, KEY_IDS["p256"])
    site, port = setup.site, setup.nginx.port
    proxy_port = free_port()
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "kmsproxy", "serve", "--verbose",
                str(site.path("ca.key")), str(site.path("ca.crt")),
                "--clientkey", uri, "--clientcert", uri,
                "--trust", str(site.path("upstream-ca.crt")),
                "--listen", f"127.0.0.1:{proxy_port}", "--pac-listen", "127.0.0.1:0",
            ],
            stderr=stderr,
            text=True,
            env=setup.hsm.environment(),
        )  # fmt: skip
    try:
        wait_for_text(log, "Proxy listening")
        result = await curl(
            "--proxy", f"http://127.0.0.1:{proxy_port}",
            "--cacert", str(site.path("ca.crt")), f"https://localhost:{port}/subject",
        )  # fmt: skip
        process.send_signal(signal.SIGHUP)
        wait_for_text(log, "Reloaded identities")
    finally:
        stop_cli(process)
    output = log.read_text()
    assert result.stdout == b"subject=CN=token p256\n"
    assert "pin-value=***" in output
    assert USER_PIN not in output
