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

# O_NONBLOCK makes opening a FIFO return at once; Windows has no FIFOs and
# no such flag.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """Return the content of the regular file `path`, at most `limit` bytes.

    Raise `OSError` whose `strerror` names the problem: the file is missing
    or unreadable, is not a regular file (a FIFO, a device, a directory), is
    larger than `limit` bytes, or its path contains a NUL byte.
    """
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except ValueError:
        # os.open raises ValueError for a path with an embedded NUL byte.
        raise OSError(errno.EINVAL, "the path contains a NUL byte") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if status.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        # A regular file that grows while it is read stops at limit + 1 bytes.
        while size <= limit:
            chunk = os.read(descriptor, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def read_key_file(path: Path) -> bytes:
    """Read a key or certificate file (see `read_small_file`)."""
    return read_small_file(path, MAX_KEY_FILE_BYTES)
