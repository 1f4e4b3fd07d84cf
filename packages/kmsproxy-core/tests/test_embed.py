"""Embedding the proxy in another anyio program takes a few lines."""

from __future__ import annotations

import signal
import types
from pathlib import Path

import anyio
import anyio.abc
import pytest

from kmsproxy import Proxy, ProxyConfig, Signer, SoftwareSigner, UserError, hookimpl
from kmsproxy.cli.demo import (
    create_demo_files,
    fetch_through_proxy,
    serve_mtls_upstream,
    upstream_context,
)
from kmsproxy.plugins.file import load_private_key
from kmsproxy.uri import KeyURI

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


class CountingSigner(SoftwareSigner):
    """A file key that counts how often it was closed."""

    def __init__(self, path: Path) -> None:
        super().__init__(load_private_key(path), f"counting:path={path}")
        self.close_count = 0

    async def aclose(self) -> None:
        self.close_count += 1


def counting_backend(opened: list[CountingSigner]) -> types.ModuleType:
    """Build a backend for `counting:path=KEY` that records what it opens."""
    module = types.ModuleType("counting_backend")

    @hookimpl
    def kmsproxy_schemes() -> list[str]:
        return ["counting"]

    @hookimpl
    def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
        signer = CountingSigner(Path(uri.get("path") or ""))
        opened.append(signer)
        return signer

    module.kmsproxy_schemes = kmsproxy_schemes  # type: ignore[attr-defined]
    module.kmsproxy_open_signer = kmsproxy_open_signer  # type: ignore[attr-defined]
    return module


async def test_stop_closes_opened_keys(tmp_path: Path) -> None:
    files = create_demo_files(tmp_path)
    opened: list[CountingSigner] = []
    config = ProxyConfig(
        ca_key=f"counting:path={files.ca_key}",
        ca_certificate=files.ca_certificate,
        client_keys=[f"counting:path={files.client_key}"],
        client_certificates=[files.client_certificate],
        listen="127.0.0.1:0",
        pac_listen=None,
        plugins=[counting_backend(opened)],
    )
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            await group.start(Proxy(config).serve)
            assert [signer.close_count for signer in opened] == [0, 0]
            group.cancel_scope.cancel()
    assert [signer.close_count for signer in opened] == [1, 1]


async def test_stop_keeps_given_keys_open(tmp_path: Path) -> None:
    files = create_demo_files(tmp_path)
    ca_signer = CountingSigner(files.ca_key)
    client_signer = CountingSigner(files.client_key)
    config = ProxyConfig(
        ca_key=ca_signer,
        ca_certificate=files.ca_certificate,
        client_keys=[client_signer],
        client_certificates=[files.client_certificate],
        listen="127.0.0.1:0",
        pac_listen=None,
    )
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            await group.start(Proxy(config).serve)
            group.cancel_scope.cancel()
    assert ca_signer.close_count == 0
    assert client_signer.close_count == 0


async def test_failed_start_closes_opened_keys(tmp_path: Path) -> None:
    files = create_demo_files(tmp_path)
    opened: list[CountingSigner] = []
    config = ProxyConfig(
        ca_key=f"counting:path={files.ca_key}",
        ca_certificate=files.ca_certificate,
        client_keys=[f"counting:path={files.client_key}"],
        # The CA's certificate matches no client key, so `load` fails.
        client_certificates=[files.ca_certificate],
        listen="127.0.0.1:0",
        pac_listen=None,
        plugins=[counting_backend(opened)],
    )
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            with pytest.raises(UserError, match="no client certificate matches"):
                await group.start(Proxy(config).serve)
    assert len(opened) == 2
    assert [signer.close_count for signer in opened] == [1, 1]


async def test_bind_failure_closes_opened_keys(tmp_path: Path) -> None:
    files = create_demo_files(tmp_path)
    opened: list[CountingSigner] = []
    with anyio.fail_after(20):
        async with await anyio.create_tcp_listener(
            local_host="127.0.0.1", local_port=0
        ) as taken:
            # anyio's typed attribute lookup (ruff mistakes it for Django's).
            port = taken.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
            config = ProxyConfig(
                ca_key=f"counting:path={files.ca_key}",
                ca_certificate=files.ca_certificate,
                client_keys=[f"counting:path={files.client_key}"],
                client_certificates=[files.client_certificate],
                listen=f"127.0.0.1:{port}",
                pac_listen=None,
                plugins=[counting_backend(opened)],
            )
            async with anyio.create_task_group() as group:
                with pytest.raises(UserError, match="already in use"):
                    await group.start(Proxy(config).serve)
    assert [signer.close_count for signer in opened] == [1, 1]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
@pytest.mark.parametrize("handle_signals", [False, True])
async def test_sighup_handler_only_on_request(
    tmp_path: Path, handle_signals: bool
) -> None:
    files = create_demo_files(tmp_path)
    config = ProxyConfig(
        ca_key=files.ca_key,
        ca_certificate=files.ca_certificate,
        client_keys=[files.client_key],
        client_certificates=[files.client_certificate],
        listen="127.0.0.1:0",
        pac_listen=None,
    )
    # The False case leaves the field unset, so it checks the default.
    if handle_signals:
        config.handle_signals = True
    before = signal.getsignal(signal.SIGHUP)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            await group.start(Proxy(config).serve)
            during = signal.getsignal(signal.SIGHUP)
            group.cancel_scope.cancel()
    assert (during is not before) == handle_signals
