"""The proxy end to end with yubikey: URIs on a stand-in token -> nginx.

The stand-in is a SoftHSM2 token laid out as ykcs11 presents a YubiKey
(`yubikey_standin`); nginx checks the client certificate read from the
same slot.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from peers import free_port
from proxy_site import curl, make_site, nginx_for, serving
from softhsm_token import activate, create_softhsm
from test_cli import wait_for_line
from test_pkcs11_proxy import Setup, stop_cli
from yubikey_standin import PIV_PIN, TOKEN, fill_slot, slot_uri

from kmsproxy import Proxy
from kmsproxy_yubikey.slots import parse_slot

pytestmark = [pytest.mark.anyio, pytest.mark.interop]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    hsm = create_softhsm(tmp_path_factory.mktemp("softhsm"))
    site = make_site(tmp_path_factory.mktemp("site"))
    for active in activate(hsm):
        active.init_token(TOKEN, PIV_PIN)
        fill_slot(active, parse_slot("9a"), "p256", site.client_ca, "piv 9a")
        fill_slot(active, parse_slot("9c"), "rsa2048", site.client_ca, "piv 9c")
        with nginx_for(site) as nginx:
            yield Setup(active, site, nginx, certificates={})


@pytest.mark.parametrize("slot", ["9a", "9c"])
async def test_slot_key_and_certificate_reach_nginx(setup: Setup, slot: str) -> None:
    key = slot_uri(setup.hsm, slot)
    proxy = Proxy(setup.site.config(client_keys=[key], client_certificates=[key]))
    async with serving(proxy) as addresses:
        result = await curl(
            "--proxy", addresses.proxy_url,
            "--cacert", str(setup.site.path("ca.crt")),
            f"https://localhost:{setup.nginx.port}/subject",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == f"subject=CN=piv {slot}\n".encode()


async def test_go_form_serve_with_yubikey_uri(setup: Setup) -> None:
    # step-kmsproxy-plugin's form: KMSURI CERT KEY, the chain read from KMSURI.
    site = setup.site
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "kmsproxy", "serve",
            slot_uri(setup.hsm, "9a"), str(site.path("ca.crt")),
            str(site.path("ca.key")),
            "--trust", str(site.path("upstream-ca.crt")),
            "--listen", f"127.0.0.1:{port}", "--pac-listen", "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=setup.hsm.environment(),
    )  # fmt: skip
    try:
        wait_for_line(process, r"Proxy listening")
        result = await curl(
            "--proxy", f"http://127.0.0.1:{port}",
            "--cacert", str(site.path("ca.crt")),
            f"https://localhost:{setup.nginx.port}/subject",
        )  # fmt: skip
    finally:
        stop_cli(process)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=piv 9a\n"
