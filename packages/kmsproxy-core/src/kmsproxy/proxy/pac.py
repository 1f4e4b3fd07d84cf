"""The PAC listener's responses: the `--pac` file for any GET path but
`/metrics`, which `prometheus.py` serves.

Browsers and OS proxy settings fetch a proxy auto-config file (a JavaScript
`FindProxyForURL` function) from a URL. The file is read again for every
request, so edits take effect without a restart. It is read in a worker
thread and served only if it is a regular file of at most `MAX_PAC_BYTES`,
so a FIFO, a device or a huge file cannot stall or bloat the proxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.to_thread

from kmsproxy.errors import UserError
from kmsproxy.proxy.connect import RequestHead, text_response

logger = logging.getLogger(__name__)

# The media type browsers expect for PAC files (Netscape's original name).
PAC_MEDIA_TYPE = "application/x-ns-proxy-autoconfig"

# Maximum size of a PAC file in bytes. Hand-written PAC files are a few KiB,
# so 1 MiB is an estimate that leaves room for long host lists. The whole
# file is held in memory for each request, so the limit bounds that memory.
MAX_PAC_BYTES = 1024 * 1024

# Seconds allowed for reading the PAC file: a local file takes
# milliseconds, and a hung network file system must not hold requests.
PAC_READ_TIMEOUT_SECONDS = 5.0

# PAC file reads that may run at once. A read that times out leaves its
# worker thread blocked (a thread cannot be cancelled), and it keeps its
# token until it returns, so a hung file system costs at most this many
# threads. Browsers fetch the file once per network change, so 4 leaves
# room for a few clients at the same moment.
MAX_CONCURRENT_PAC_READS = 4

# Seconds allowed for sending one PAC response, so a client that never
# reads cannot hold the connection and the file's bytes.
PAC_SEND_TIMEOUT_SECONDS = 10.0


class PacFileError(Exception):
    """The PAC file cannot be served; `str()` is a one-line reason."""


def check_pac_file(pac_file: Path) -> None:
    """Raise `UserError` at start when `pac_file` is not a regular file."""
    try:
        _stat_regular_file(pac_file)
    except PacFileError as error:
        raise UserError(f"--pac {pac_file}: {error}") from None


def _stat_regular_file(path: Path) -> os.stat_result:
    # os.stat follows symbolic links, so a link is accepted only when its
    # target is a regular file.
    try:
        result = os.stat(path)
    except FileNotFoundError:
        raise PacFileError("the PAC file was not found") from None
    except OSError as error:
        raise PacFileError(f"cannot read the PAC file: {error.strerror}") from None
    if not stat.S_ISREG(result.st_mode):
        raise PacFileError("the PAC file is not a regular file")
    if result.st_size > MAX_PAC_BYTES:
        raise PacFileError(f"the PAC file is larger than {MAX_PAC_BYTES} bytes")
    return result


def read_pac_file(path: Path) -> bytes:
    """Read a regular file of at most `MAX_PAC_BYTES`; raise `PacFileError`.

    Blocking: call it in a worker thread.
    """
    _stat_regular_file(path)
    # O_NONBLOCK keeps open() from waiting for a writer if the path was
    # replaced by a FIFO after the stat. fstat then checks what was opened.
    # Windows has neither flag (nor FIFOs at a file path), so there they are 0.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise PacFileError(f"cannot read the PAC file: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise PacFileError("the PAC file is not a regular file")
        body = file.read(MAX_PAC_BYTES + 1)
    if len(body) > MAX_PAC_BYTES:
        raise PacFileError(f"the PAC file is larger than {MAX_PAC_BYTES} bytes")
    return body


class PacReadersBusy(Exception):
    """Every PAC read token is held by a read that has not returned."""


async def _read_in_thread(path: Path, readers: anyio.CapacityLimiter) -> bytes:
    """Run `read_pac_file` in a worker thread that holds a token of `readers`.

    The thread itself returns the token when the read ends, even after this
    coroutine was cancelled, so a hung read keeps its token. Raise
    `PacReadersBusy` at once when no token is free.
    """
    borrower = object()
    try:
        readers.acquire_on_behalf_of_nowait(borrower)
    except anyio.WouldBlock:
        raise PacReadersBusy from None

    def read_then_release() -> bytes:
        try:
            return read_pac_file(path)
        finally:
            # RuntimeError: the event loop has already stopped.
            with contextlib.suppress(RuntimeError):
                anyio.from_thread.run_sync(readers.release_on_behalf_of, borrower)

    return await anyio.to_thread.run_sync(read_then_release, abandon_on_cancel=True)


async def pac_response(
    head: RequestHead,
    pac_file: Path | None,
    readers: anyio.CapacityLimiter | None = None,
) -> bytes:
    """Build the response to one request on the PAC listener.

    `readers` bounds the reads running at once; the PAC listener shares one
    among its requests. Without it, the read gets a limiter of its own.
    """
    if head.method not in ("GET", "HEAD"):
        return text_response(
            405,
            f"method {head.method} is not allowed: this port serves the PAC file "
            "with GET",
            (("Allow", "GET, HEAD"),),
        )
    if pac_file is None:
        return text_response(404, "no PAC file configured (start with --pac FILE)")
    if readers is None:
        readers = anyio.CapacityLimiter(MAX_CONCURRENT_PAC_READS)
    try:
        with anyio.fail_after(PAC_READ_TIMEOUT_SECONDS):
            body = await _read_in_thread(pac_file, readers)
    except PacReadersBusy:
        reason = (
            f"{MAX_CONCURRENT_PAC_READS} earlier reads of the PAC file have not "
            "returned yet"
        )
        logger.warning("PAC file not served path=%s reason=%s", pac_file, reason)
        return text_response(500, reason)
    except TimeoutError:
        reason = f"reading the PAC file timed out after {PAC_READ_TIMEOUT_SECONDS:g} s"
        logger.warning("PAC file not served path=%s reason=%s", pac_file, reason)
        return text_response(500, reason)
    except PacFileError as error:
        # The body leaves out the path, because any local client can read it.
        logger.warning("PAC file not served path=%s reason=%s", pac_file, error)
        return text_response(500, f"{error} (see the kmsproxy log)")
    fields = (
        f"HTTP/1.1 200 OK\r\nContent-Type: {PAC_MEDIA_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-cache\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return fields if head.method == "HEAD" else fields + body
