"""Embedding the proxy in another anyio program takes a few lines."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from kmsproxy import Proxy, ProxyConfig, UserError
from kmsproxy.cli.demo import (
    create_demo_files,
    fetch_through_proxy,
    serve_mtls_upstream,
    upstream_context,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_embedded_proxy_serves(tmp_path: Path) -> None:
    files = create_demo_files(tmp_path)
    async with anyio.create_task_group() as group:
        upstream_port = await group.start(
            serve_mtls_upstream, "127.0.0.1", upstream_context(files)
        )

        # The embedding itself: a config, then `serve` in your task group.
        config = ProxyConfig(
            ca_key=files.ca_key,
            ca_certificate=files.ca_certificate,
            client_keys=[files.client_key],
            client_certificates=[files.client_certificate],
            trust=[files.upstream_ca],
            listen="127.0.0.1:0",
            pac_listen=None,
        )
        addresses = await group.start(Proxy(config).serve)
        proxy = addresses.proxy[0]

        with anyio.fail_after(20):
            body = await fetch_through_proxy(
                (proxy.host, proxy.port),
                "127.0.0.1",
                upstream_port,
                files.ca_certificate,
            )
        group.cancel_scope.cancel()
    assert b"subject=CN=kmsproxy demo client" in body
    assert addresses.proxy_url == f"http://127.0.0.1:{proxy.port}"


async def test_bad_config_raises_from_start(tmp_path: Path) -> None:
    files = create_demo_files(tmp_path)
    config = ProxyConfig(
        ca_key=files.ca_key,
        ca_certificate=files.ca_certificate,
        client_keys=[files.client_key],
        client_certificates=[files.ca_certificate],
        listen="127.0.0.1:0",
        pac_listen=None,
    )
    async with anyio.create_task_group() as group:
        with pytest.raises(UserError, match="no client certificate matches"):
            await group.start(Proxy(config).serve)
