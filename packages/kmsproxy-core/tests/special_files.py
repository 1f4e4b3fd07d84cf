"""Paths that are not small regular files, for tests of bounded file reads.

Each case is an input from the attack that wedged reloads and startup: a
FIFO without a writer, /dev/zero, a directory, a sparse 2 GiB file and a
path with a NUL byte. `special_file` creates one under a test's tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from kmsproxy.files import MAX_SECRET_FILE_BYTES

# Bound on a test that reads one of these paths (pytest-timeout). A
# regression blocks on the FIFO or reads /dev/zero forever, so the bound
# turns a hang into a failure; a correct read returns in milliseconds.
SPECIAL_FILE_TIMEOUT_SECONDS = 10

# A sparse file this large costs no disk space but would fill the memory
# of a reader without a limit.
HUGE_FILE_BYTES = 2 * 1024**3

# The case names, and the reason each read must fail with.
SPECIAL_CASES: dict[str, str] = {
    "fifo": "not a regular file",
    "zero": "not a regular file",
    "directory": "not a regular file",
    "huge": f"larger than {MAX_SECRET_FILE_BYTES} bytes",
    "nul": "the path contains a NUL byte",
}


def special_file(case: str, directory: Path) -> Path:
    """Create the path for `case` (a key of `SPECIAL_CASES`) in `directory`."""
    if case == "fifo":
        path = directory / "fifo"
        os.mkfifo(path)
        return path
    if case == "zero":
        # A symlink, as a watched path would be replaced in practice.
        path = directory / "zero"
        path.symlink_to("/dev/zero")
        return path
    if case == "directory":
        path = directory / "directory"
        path.mkdir()
        return path
    if case == "huge":
        path = directory / "huge"
        with path.open("wb") as file:
            file.truncate(HUGE_FILE_BYTES)
        return path
    if case == "nul":
        return directory / "a\x00b"
    raise ValueError(f"unknown special file case {case!r}")


def uri_value(path: Path) -> str:
    """Percent-encode `path` for a URI attribute, so a NUL byte survives."""
    return quote(str(path), safe="/")
