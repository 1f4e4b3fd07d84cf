"""The accept loop under descriptor exhaustion and at the connection cap."""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
from pki import issue, make_ca

from kmsproxy import Proxy, ProxyConfig
from kmsproxy.proxy.accept import (
    connection_limit,
    serve_listener,
)

# Soft RLIMIT_NOFILE of the child proxy: enough to start (about 20
# descriptors), few enough that the idle connections below exhaust it.
CHILD_DESCRIPTOR_LIMIT = 48

# Idle connections opened against the child: more than its limit allows.
IDLE_CONNECTIONS = 80

# Upper bound for the child to start and print its port, and for one probe.
CHILD_START_SECONDS = 20.0
PROBE_SECONDS = 10.0

# Pause between two probes that wait for a freed connection slot.
RETRY_SECONDS = 0.02

# Runs a Proxy in a child process: argv is the directory with the files and
# the max_connections value ("none" for the default). It prints the port.
CHILD_SCRIPT = """
import logging, resource, sys
from pathlib import Path
import anyio
from kmsproxy import Proxy, ProxyConfig

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
directory = Path(sys.argv[1])
limit = int(sys.argv[2])
maximum = None if sys.argv[3] == "none" else int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

async def main():
    config = ProxyConfig(
        ca_key=directory / "ca.key",
        ca_certificate=directory / "ca.crt",
        client_keys=[directory / "client.key"],
        client_certificates=[directory / "client.crt"],
        trust=[directory / "trust.pem"],
        include_system_trust=False,
        listen="127.0.0.1:0",
        pac_listen=None,
        handle_signals=False,
        max_connections=maximum,
    )
    async with anyio.create_task_group() as group:
        addresses = await group.start(Proxy(config).serve)
        print(addresses.proxy[0].port, flush=True)

anyio.run(main)
"""


def write_pki(directory: Path) -> None:
    make_ca("kmsproxy test local CA").write(directory, "ca")
    client_ca = make_ca("client CA")
    issue(client_ca, "proxy client", client=True).write(directory, "client")
    (directory / "trust.pem").write_bytes(make_ca("upstream CA").chain_pem())


def probe(port: int) -> bytes:
    """Send a GET, which the proxy answers with 405, and read the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_SECONDS) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock.recv(4096)


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    write_pki(tmp_path)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD_SCRIPT,
            str(tmp_path),
            str(CHILD_DESCRIPTOR_LIMIT),
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], CHILD_START_SECONDS)
        line = process.stdout.readline() if ready else ""
        assert line.strip().isdigit(), f"child did not start: {line!r}"
        yield process, int(line)
    finally:
        process.kill()
        process.wait(timeout=CHILD_START_SECONDS)


def test_emfile_keeps_serving(child: tuple[subprocess.Popen[str], int]) -> None:
    process, port = child
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # Give the child time to hit EMFILE on the connections it cannot take.
        time.sleep(1.0)
        assert process.poll() is None
    finally:
        for sock in idle:
            sock.close()
    reply = probe(port)
    assert reply.startswith(b"HTTP/1.1 405 ")
    assert process.poll() is None
    process.kill()
    _, stderr = process.communicate(timeout=CHILD_START_SECONDS)
    assert "Accept failed, retrying error=EMFILE" in stderr
    assert "Traceback" not in stderr


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_excess_connection_closed(tmp_path: Path) -> None:
    write_pki(tmp_path)
    config = ProxyConfig(
        ca_key=tmp_path / "ca.key",
        ca_certificate=tmp_path / "ca.crt",
        client_keys=[tmp_path / "client.key"],
        client_certificates=[tmp_path / "client.crt"],
        trust=[tmp_path / "trust.pem"],
        include_system_trust=False,
        listen="127.0.0.1:0",
        pac_listen=None,
        handle_signals=False,
        max_connections=2,
    )
    async with anyio.create_task_group() as group:
        addresses = await group.start(Proxy(config).serve)
        address = ("127.0.0.1", addresses.proxy[0].port)
        with anyio.fail_after(PROBE_SECONDS):
            first = await anyio.connect_tcp(*address)
            second = await anyio.connect_tcp(*address)
            third = await anyio.connect_tcp(*address)
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await third.receive()
            await first.aclose()
            await second.aclose()
            await third.aclose()
            # Both tokens are free again once the handlers see EOF; until
            # then a new connection is closed unanswered, so retry.
            reply = b""
            for _ in range(int(PROBE_SECONDS / RETRY_SECONDS)):
                async with await anyio.connect_tcp(*address) as fourth:
                    await fourth.send(b"GET / HTTP/1.1\r\n\r\n")
                    try:
                        reply = await fourth.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        await anyio.sleep(RETRY_SECONDS)
                        continue
                break
            assert reply.startswith(b"HTTP/1.1 405 ")
        group.cancel_scope.cancel()


# Runs `connection_limit()` with a soft RLIMIT_NOFILE of 100 and prints it.
RLIMIT_SCRIPT = """
import resource
from kmsproxy.proxy.accept import connection_limit
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))
print(connection_limit())
"""

# Hides `resource` as on Windows, where it does not exist, then runs the CLI.
NO_RESOURCE_SCRIPT = """
import runpy, sys
sys.modules["resource"] = None
sys.argv = ["kmsproxy", "--version"]
runpy.run_module("kmsproxy", run_name="__main__")
"""


def test_limit_follows_rlimit() -> None:
    # 100 descriptors: 25 reserved, (100 - 25) // 2 = 37 connections.
    result = subprocess.run(
        [sys.executable, "-c", RLIMIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=CHILD_START_SECONDS,
        check=True,
    )
    assert result.stdout.strip() == "37"


def test_runs_without_resource_module() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_RESOURCE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=CHILD_START_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("kmsproxy ")


def test_explicit_limit_wins() -> None:
    assert connection_limit(5) == 5


async def loopback_listener() -> anyio.abc.SocketListener:
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    (inner,) = multi.listeners
    assert isinstance(inner, anyio.abc.SocketListener)
    return inner


class FailingListener(anyio.abc.SocketListener):
    """A real loopback listener whose first accept() raises `errno_value`."""

    def __init__(self, inner: anyio.abc.SocketListener, errno_value: int) -> None:
        self._inner = inner
        self._errno = errno_value
        self.failures = 0

    async def accept(self) -> anyio.abc.SocketStream:
        if self.failures == 0:
            self.failures += 1
            raise OSError(self._errno, os.strerror(self._errno))
        return await self._inner.accept()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def _raw_socket(self) -> socket.socket:
        return self._inner.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610


async def answer(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        await stream.send(b"served")


@pytest.mark.anyio
@pytest.mark.parametrize("code", [errno.EPROTO, errno.EPERM, errno.ENETDOWN])
async def test_connection_error_keeps_accepting(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    inner = await loopback_listener()
    listener = FailingListener(inner, code)
    port = inner.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    async with anyio.create_task_group() as group:
        group.start_soon(serve_listener, listener, answer, anyio.CapacityLimiter(4))
        with anyio.fail_after(PROBE_SECONDS):
            async with await anyio.connect_tcp("127.0.0.1", port) as client:
                assert await client.receive() == b"served"
        group.cancel_scope.cancel()
    assert f"Accept failed, continuing error={errno.errorcode[code]}" in caplog.text


@pytest.mark.anyio
async def test_listener_error_ends_loop() -> None:
    inner = await loopback_listener()
    listener = FailingListener(inner, errno.EBADF)
    with anyio.fail_after(PROBE_SECONDS), pytest.raises(ExceptionGroup) as caught:
        await serve_listener(listener, answer, anyio.CapacityLimiter(4))
    await inner.aclose()
    assert caught.group_contains(OSError, match="Bad file descriptor")
