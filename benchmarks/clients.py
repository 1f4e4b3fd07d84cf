"""The load the benchmark puts on each path: curl for bulk transfers, and
Python clients for fresh-connection latency, concurrency and idle tunnels.

A `Route` describes how a client reaches the upstream: TLS straight to an
address (direct, or the nginx terminator), or an HTTP CONNECT through a
proxy first. Every client here speaks HTTP/1.1 and parses just enough of
each response (the head and Content-Length) to know where it ends.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from servers import LOOPBACK, SERVER_NAME, Process, StartError

# Bytes read per receive by the Python clients.
READ_BYTES = 65536

# Maximum bytes of a response head; nginx's are a few hundred.
MAX_HEAD_BYTES = 16384

# Seconds one request of the Python clients may take before the run fails.
# A loopback request takes milliseconds; a minute means something hung.
REQUEST_TIMEOUT_SECONDS = 60.0

# Seconds one curl transfer may take: 1 GiB at the slowest rate seen so
# far (about 20 MB/s, through mitmproxy) takes under a minute.
CURL_TIMEOUT_SECONDS = 600.0

# Delay between attempts while waiting for a starting proxy's first response.
FIRST_RESPONSE_POLL_SECONDS = 0.01


class BenchError(Exception):
    """A request of the benchmark failed; the message names the route."""


@dataclass(frozen=True)
class Route:
    """The way a client reaches the upstream's `/small` and `/big`.

    `proxy_port` set: TCP to the proxy on 127.0.0.1, CONNECT to
    `localhost:upstream_port`, then TLS inside the tunnel. Unset: TLS
    straight to 127.0.0.1:`upstream_port`. `client_cert` is the
    (certificate, key) pair the client presents itself, on the direct path.
    """

    name: str
    upstream_port: int
    cafile: Path
    proxy_port: int | None = None
    client_cert: tuple[Path, Path] | None = None

    def url(self, path: str) -> str:
        return f"https://{SERVER_NAME}:{self.upstream_port}{path}"

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cafile))
        if self.client_cert is not None:
            context.load_cert_chain(*map(str, self.client_cert))
        return context

    def curl_arguments(self) -> list[str]:
        arguments = ["--cacert", str(self.cafile)]
        if self.proxy_port is not None:
            arguments += ["--proxy", f"http://{LOOPBACK}:{self.proxy_port}"]
        else:
            arguments += ["--resolve", f"{SERVER_NAME}:{self.upstream_port}:{LOOPBACK}"]
        if self.client_cert is not None:
            certificate, key = self.client_cert
            arguments += ["--cert", str(certificate), "--key", str(key)]
        return arguments


def _request(path: str, *, keep_alive: bool) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\n"
        f"Connection: {connection}\r\n\r\n"
    ).encode()


def _connect_request(route: Route) -> bytes:
    authority = f"{SERVER_NAME}:{route.upstream_port}"
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


def _content_length(head: bytes, route: Route) -> int:
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise BenchError(f"{route.name}: unexpected response {status!r}")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise BenchError(f"{route.name}: response without Content-Length")


# curl: bulk transfers.


@dataclass(frozen=True)
class Transfer:
    """One curl transfer: the body bytes moved and curl's `time_total`."""

    size_bytes: int
    seconds: float

    @property
    def megabytes(self) -> float:
        """The body size in MB (10^6 bytes)."""
        return self.size_bytes / 1e6

    @property
    def mbps(self) -> float:
        """The throughput in MB/s (10^6 bytes per second)."""
        return self.megabytes / self.seconds


def curl_download(route: Route, path: str) -> Transfer:
    """Download `path` with curl, discarding the body."""
    output = _run_curl(
        route,
        [route.url(path), "-o", "/dev/null", "-w", "%{time_total} %{size_download}"],
    )
    seconds, size = output.split()
    return Transfer(int(size), float(seconds))


def curl_upload(route: Route, source: Path) -> Transfer:
    """PUT `source` to /upload/ with curl."""
    output = _run_curl(
        route,
        [
            "-T",
            str(source),
            # No `Expect: 100-continue`: every path then sends the body at once.
            "-H",
            "Expect:",
            route.url("/upload/blob"),
            "-o",
            "/dev/null",
            "-w",
            "%{time_total} %{size_upload}",
        ],
    )
    seconds, size = output.split()
    return Transfer(int(size), float(seconds))


def _run_curl(route: Route, arguments: list[str]) -> str:
    argv = ["curl", "-sS", "--fail", *route.curl_arguments(), *arguments]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(
            f"{route.name}: curl failed with status {result.returncode}: "
            f"{result.stderr.strip()}"
        )
    return result.stdout


# Blocking client: fresh connections and idle tunnels.


def open_tls(
    route: Route, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLSocket:
    """Open TCP (and the CONNECT tunnel) and complete the TLS handshake."""
    port = route.proxy_port or route.upstream_port
    sock = socket.create_connection((LOOPBACK, port), timeout=REQUEST_TIMEOUT_SECONDS)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if route.proxy_port is not None:
            sock.sendall(_connect_request(route))
            head = _read_head(sock, route)
            if not head.startswith(b"HTTP/1.1 200") and not head.startswith(
                b"HTTP/1.0 200"
            ):
                raise BenchError(f"{route.name}: CONNECT failed with {head[:60]!r}")
        return context.wrap_socket(sock, server_hostname=SERVER_NAME, session=session)
    except BaseException:
        sock.close()
        raise


def _read_head(sock: socket.socket, route: Route) -> bytes:
    """Read one response head byte by byte, so nothing after it is consumed."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte or len(head) > MAX_HEAD_BYTES:
            raise BenchError(f"{route.name}: no complete response head")
        head += byte
    return bytes(head)


def fetch(route: Route, sock: ssl.SSLSocket, path: str, *, keep_alive: bool) -> int:
    """Send one GET on `sock` and read the whole response; return body size."""
    sock.sendall(_request(path, keep_alive=keep_alive))
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(READ_BYTES)
        if not data or len(buffer) > MAX_HEAD_BYTES:
            raise BenchError(f"{route.name}: connection ended before the head")
        buffer += data
    head, _, body = bytes(buffer).partition(b"\r\n\r\n")
    length = _content_length(head, route)
    received = len(body)
    while received < length:
        data = sock.recv(READ_BYTES)
        if not data:
            raise BenchError(f"{route.name}: connection ended inside the body")
        received += len(data)
    return length


@dataclass
class LatencySample:
    """Seconds per fresh request, and how many handshakes were resumed."""

    seconds: list[float]
    resumed: int


def fresh_latencies(route: Route, count: int, *, resume: bool) -> LatencySample:
    """Time `count` sequential requests, each on a new TCP and TLS connection.

    With `resume`, each handshake offers the session of the previous one.
    The time runs from the TCP connect to the last byte of the response.
    """
    context = route.context()
    session: ssl.SSLSession | None = None
    seconds: list[float] = []
    resumed = 0
    for _ in range(count):
        started = time.perf_counter()
        with open_tls(route, context, session if resume else None) as sock:
            fetch(route, sock, "/small", keep_alive=False)
            seconds.append(time.perf_counter() - started)
            resumed += int(bool(sock.session_reused))
            session = sock.session
    return LatencySample(seconds, resumed)


def open_idle_tunnels(route: Route, count: int) -> list[ssl.SSLSocket]:
    """Open `count` connections, fetch /small on each and keep them open."""
    context = route.context()
    sockets: list[ssl.SSLSocket] = []
    session: ssl.SSLSession | None = None
    try:
        for _ in range(count):
            sock = open_tls(route, context, session)
            sockets.append(sock)
            fetch(route, sock, "/small", keep_alive=True)
            session = sock.session
    except BaseException:
        close_all(sockets)
        raise
    return sockets


def close_all(sockets: list[ssl.SSLSocket]) -> None:
    for sock in sockets:
        sock.close()


def first_response_seconds(
    start: Callable[[], Process], route: Route
) -> tuple[float, Process]:
    """Start a proxy and time until a request through it first succeeds.

    Return the seconds from starting the process to the end of that first
    response, and the process, still running for the caller to stop. On
    failure the process is stopped here.
    """
    started = time.perf_counter()
    process = start()
    try:
        return _wait_for_first_response(process, route, started), process
    except BaseException:
        process.stop()
        raise


def _wait_for_first_response(process: Process, route: Route, started: float) -> float:
    deadline = started + REQUEST_TIMEOUT_SECONDS
    context: ssl.SSLContext | None = None
    while time.perf_counter() < deadline:
        if process.popen.poll() is not None:
            raise StartError(f"{process.name} exited; its log:\n{process.log()}")
        try:
            # mitmproxy writes its CA certificate only once it has started.
            context = context or route.context()
            with open_tls(route, context) as sock:
                fetch(route, sock, "/small", keep_alive=False)
        except (OSError, BenchError):
            time.sleep(FIRST_RESPONSE_POLL_SECONDS)
            continue
        return time.perf_counter() - started
    raise BenchError(
        f"{route.name}: no response within {REQUEST_TIMEOUT_SECONDS:g} s of start"
    )


# asyncio client: concurrent keep-alive requests.


async def _open_stream(
    route: Route, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = route.proxy_port or route.upstream_port
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    if route.proxy_port is not None:
        writer.write(_connect_request(route))
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            raise BenchError(f"{route.name}: CONNECT failed with {head[:60]!r}")
    await writer.start_tls(context, server_hostname=SERVER_NAME)
    return reader, writer


async def _keep_fetching(
    route: Route,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    start: asyncio.Event,
    stop: asyncio.Event,
) -> int:
    request = _request("/small", keep_alive=True)
    await start.wait()
    done = 0
    while not stop.is_set():
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(_content_length(head, route))
        done += 1
    return done


async def _requests_per_second(route: Route, clients: int, seconds: float) -> float:
    context = route.context()
    streams = [await _open_stream(route, context) for _ in range(clients)]
    start, stop = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(_keep_fetching(route, reader, writer, start, stop))
        for reader, writer in streams
    ]
    started = time.perf_counter()
    start.set()
    await asyncio.sleep(seconds)
    stop.set()
    async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
        counts = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    for _, writer in streams:
        writer.close()
    return sum(counts) / elapsed


def requests_per_second(route: Route, clients: int, seconds: float) -> float:
    """Run `clients` keep-alive connections fetching /small for `seconds`.

    The connections are opened before the clock starts, so this measures
    the relay and the upstream, not connection setup.
    """
    return asyncio.run(_requests_per_second(route, clients, seconds))
