"""Keys open in a worker thread, so the event loop serves meanwhile.

A backend's open hook blocks while it reaches the device (a TPM, a token, a
KMS endpoint). An application that embeds `Proxy` keeps its event loop,
and here another proxy's PAC listener, serving requests during that time.
"""

from __future__ import annotations

import threading
import types

import anyio
import pytest
from proxy_site import Site, exchange, site
from test_proxy import anyio_backend

from kmsproxy import Proxy
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.signer import Signer, SoftwareSigner
from kmsproxy.uri import KeyURI

__all__ = ["anyio_backend", "site"]

pytestmark = pytest.mark.anyio

# Bound for the blocked hook. The test releases it once the other proxy has
# responded; a hook that blocks the event loop waits this long instead, and the
# test fails on that timeout.
HOOK_RELEASE_TIMEOUT_SECONDS = 10.0

# Bound for each step that waits on the other proxy or on the hook.
STEP_TIMEOUT_SECONDS = 10.0


def slow_backend(
    site: Site, entered: threading.Event, release: threading.Event, released: list[bool]
) -> types.ModuleType:
    """Build a backend whose open hook blocks until `release` is set.

    `released` gets True when the release came in time, False on the timeout.
    """
    module = types.ModuleType("slow_backend")

    @hookimpl
    def kmsproxy_schemes() -> list[str]:
        return ["slow"]

    @hookimpl
    def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
        entered.set()
        released.append(release.wait(HOOK_RELEASE_TIMEOUT_SECONDS))
        return SoftwareSigner(site.client.key, uri.redacted())

    module.kmsproxy_schemes = kmsproxy_schemes  # type: ignore[attr-defined]
    module.kmsproxy_open_signer = kmsproxy_open_signer  # type: ignore[attr-defined]
    return module


async def test_pac_served_while_key_opens(site: Site) -> None:
    entered = threading.Event()
    release = threading.Event()
    released: list[bool] = []
    serving = Proxy(site.config(pac_listen="127.0.0.1:0"))
    opening = Proxy(
        site.config(
            client_keys=["slow:name=k"],
            plugins=[slow_backend(site, entered, release, released)],
        )
    )
    try:
        async with anyio.create_task_group() as group:
            addresses = await group.start(serving.serve)
            pac = addresses.pac[0]
            group.start_soon(opening.serve)
            with anyio.fail_after(STEP_TIMEOUT_SECONDS):
                while not entered.is_set():
                    await anyio.sleep(0.01)
            response = await exchange(
                (pac.host, pac.port), b"GET /proxy.pac HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            release.set()
            group.cancel_scope.cancel()
    finally:
        release.set()
    assert released == [True]
    assert response.startswith(b"HTTP/1.1 404 ")
