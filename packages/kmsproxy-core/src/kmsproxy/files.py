"""Reading the small files a user names: keys, certificates, passwords.

A path may name a FIFO, a device such as /dev/zero, or a huge file, by
mistake or because someone else can write to a watched directory. A plain
`read_bytes()` waits forever on a FIFO that has no writer and reads
/dev/zero until memory runs out. `read_small_file` opens without waiting,
accepts only a regular file, and reads at most a given number of bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# Largest key or certificate chain file read. A chain of ten RSA-4096
# certificates in PEM is under 20 KiB, so 1 MiB leaves room for comments
# and bundles while bounding the memory one watched file can take.
MAX_KEY_FILE_BYTES = 1024 * 1024

# Largest password or PIN file read. A PKCS#11 PIN or a key password is at
# most a few hundred bytes.
MAX_SECRET_FILE_BYTES = 4096

# O_NONBLOCK makes opening a FIFO return at once. O_NOCTTY keeps a terminal
# device from becoming the controlling terminal of a proxy started without
# one. Windows has neither flag, nor FIFOs or terminals of that kind.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_BINARY", 0)
)


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """Return the content of the regular file `path`, at most `limit` bytes.

    Raise `OSError` whose `strerror` names the problem: the file is missing
    or unreadable, is not a regular file (a FIFO, a device, a directory), is
    larger than `limit` bytes, or its path contains a NUL byte.
    """
    descriptor = _open_regular_file(path)
    try:
        if os.fstat(descriptor).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        data = _read_at_most(descriptor, limit + 1)
        # A regular file that grows while it is read stops at limit + 1 bytes.
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        return data
    finally:
        os.close(descriptor)


def read_file_head(path: str | os.PathLike[str], count: int) -> bytes:
    """Return the first `count` bytes of the regular file `path`.

    Raise `OSError` as `read_small_file` does, except that a larger file is
    no error.
    """
    descriptor = _open_regular_file(path)
    try:
        return _read_at_most(descriptor, count)
    finally:
        os.close(descriptor)


def _open_regular_file(path: str | os.PathLike[str]) -> int:
    """Open `path` without waiting; raise `OSError` unless it is a regular file.

    The type is checked on the open descriptor, so a path replaced by a FIFO
    or a device after any earlier check is still rejected.
    """
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except ValueError:
        # os.open raises ValueError for a path with an embedded NUL byte.
        raise OSError(errno.EINVAL, "the path contains a NUL byte") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, "not a regular file")
    return descriptor


def _read_at_most(descriptor: int, count: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < count:
        chunk = os.read(descriptor, count - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_key_file(path: Path) -> bytes:
    """Read a key or certificate file (see `read_small_file`)."""
    return read_small_file(path, MAX_KEY_FILE_BYTES)
