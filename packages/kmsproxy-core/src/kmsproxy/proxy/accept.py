"""The accept loop: survive descriptor exhaustion and cap open connections.

anyio's `Listener.serve` lets an `accept()` error end the server. A process
that has run out of file descriptors gets EMFILE from `accept()`, though,
and this is a temporary state that any local client can cause by opening
idle connections. Here such errors are logged (rate-limited), the loop
sleeps for `ACCEPT_RETRY_SECONDS`, and then it accepts again. A
`CapacityLimiter` bounds the connections served at once. A connection
accepted over the limit is closed at once, before anything is read from it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

# Windows has no `resource` module and no RLIMIT_NOFILE; there the default
# limit is `MAX_CONNECTIONS` as it stands.
try:
    import resource
except ImportError:
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# Default maximum of connections served at once. Each tunnel uses two
# descriptors (client and upstream), so 1000 tunnels need about 2000.
# `connection_limit` lowers it to what the process's RLIMIT_NOFILE allows.
MAX_CONNECTIONS = 1000

# Descriptors one connection can hold: the client socket and, for a
# tunnel, the upstream socket.
DESCRIPTORS_PER_CONNECTION = 2

# Descriptors kept free for everything that is not a connection: the
# listening sockets, the event loop, the file watcher, minted keys written
# for `ssl` and the identity files a reload opens.
RESERVED_DESCRIPTORS = 64

# Seconds to wait after `accept()` fails for lack of resources. The failed
# connection stays in the listen backlog, so retrying at once would spin.
# 0.1 s keeps the CPU idle while a freed descriptor is used within a tenth
# of a second.
ACCEPT_RETRY_SECONDS = 0.1

# Minimum seconds between two WARNING lines about the same kind of rejected
# or failed accept. The next line logged counts the ones left out.
ACCEPT_WARNING_INTERVAL_SECONDS = 10.0

# accept() errors that mean "out of descriptors or memory for now"
# (accept(2) on Linux). The loop sleeps before it retries these.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# accept() errors that mean the listening socket itself is gone or unusable;
# only these end the loop. accept(2) on Linux says that every other error
# (ECONNABORTED, a pending network error such as ENETDOWN or EPROTO, EPERM
# from a firewall rule) concerns one connection and must be treated like
# EAGAIN, so the loop logs it and accepts again.
LISTENER_ERRNOS = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


def connection_limit(maximum: int | None = None) -> int:
    """Return `maximum`, or the default limit that RLIMIT_NOFILE allows.

    With no `maximum`, the limit is `MAX_CONNECTIONS`, lowered so that
    `DESCRIPTORS_PER_CONNECTION` for each connection plus
    `RESERVED_DESCRIPTORS` (a quarter of a smaller limit) fit in the soft
    RLIMIT_NOFILE. Without the `resource` module (Windows) it is
    `MAX_CONNECTIONS`. The result is always at least 1.
    """
    if maximum is not None:
        return max(1, maximum)
    if resource is None:
        return MAX_CONNECTIONS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    # A small limit (a test, a tight container) keeps a quarter in reserve,
    # so the proxy still serves a few connections.
    reserved = min(RESERVED_DESCRIPTORS, soft // 4)
    fitting = (soft - reserved) // DESCRIPTORS_PER_CONNECTION
    return max(1, min(MAX_CONNECTIONS, fitting))


class _RateLimitedWarning:
    """A WARNING logged at most once per `ACCEPT_WARNING_INTERVAL_SECONDS`."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._last_logged = -ACCEPT_WARNING_INTERVAL_SECONDS
        self._suppressed = 0

    def log(self, *args: object) -> None:
        now = anyio.current_time()
        if now - self._last_logged < ACCEPT_WARNING_INTERVAL_SECONDS:
            self._suppressed += 1
            return
        logger.warning(
            self._message + " suppressed_since_last=%d",
            *args,
            self._suppressed,
        )
        self._last_logged = now
        self._suppressed = 0


async def serve_listener(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    handler: Handler,
    limiter: anyio.CapacityLimiter,
) -> None:
    """Accept on every socket of `listener` and run `handler` in a new task.

    Serve until cancelled. Each connection holds one token of `limiter`
    while its handler runs. The handler closes the connection.
    """
    # bind() returns a MultiListener for "localhost". Each socket gets its
    # own loop, so an error on one never stops the others.
    sockets = list(getattr(listener, "listeners", [listener]))
    async with anyio.create_task_group() as group:
        for sock in sockets:
            if not isinstance(sock, anyio.abc.SocketListener):
                raise TypeError(f"expected a listener from bind(), got {sock!r}")
            group.start_soon(_accept_loop, sock, handler, limiter, group)


async def _accept_loop(
    listener: anyio.abc.SocketListener,
    handler: Handler,
    limiter: anyio.CapacityLimiter,
    group: anyio.abc.TaskGroup,
) -> None:
    out_of_resources = _RateLimitedWarning(
        "Accept failed, retrying error=%s retry_seconds=%g"
    )
    connection_failed = _RateLimitedWarning("Accept failed, continuing error=%s")
    over_limit = _RateLimitedWarning(
        "Too many connections, closing new ones max_connections=%d"
    )
    while True:
        try:
            client = await listener.accept()
        except OSError as error:
            if error.errno in LISTENER_ERRNOS:
                raise
            if error.errno == errno.ECONNABORTED:
                continue
            name = errno.errorcode.get(error.errno or 0, str(error))
            if error.errno in RESOURCE_ERRNOS:
                out_of_resources.log(name, ACCEPT_RETRY_SECONDS)
                await anyio.sleep(ACCEPT_RETRY_SECONDS)
            else:
                connection_failed.log(name)
            continue
        try:
            limiter.acquire_on_behalf_of_nowait(client)
        except anyio.WouldBlock:
            over_limit.log(int(limiter.total_tokens))
            await anyio.aclose_forcefully(client)
            continue
        group.start_soon(_run_handler, client, handler, limiter)


async def _run_handler(
    client: anyio.abc.SocketStream,
    handler: Handler,
    limiter: anyio.CapacityLimiter,
) -> None:
    try:
        await handler(client)
    finally:
        limiter.release_on_behalf_of(client)
