"""Secret files: the PIN, password or auth value that a URI names by path.

`pin-source=`, `password-file=` and a TPM key's auth value file hold the
secret on their first line. Such a path may name a FIFO without a writer,
a device such as /dev/zero, or a huge file, by mistake or through a
symlink another user controls. `read_secret_file` reads only a regular
file of at most `MAX_SECRET_FILE_BYTES`, never waits on a FIFO, and raises
an error that names the path but never the content.
"""

from __future__ import annotations

from pathlib import Path

from kmsproxy.files import MAX_SECRET_FILE_BYTES, read_small_file

__all__ = ["MAX_SECRET_FILE_BYTES", "SecretFileError", "read_secret_file"]


class SecretFileError(Exception):
    """A secret file cannot be used; the message names the path, not the content.

    Callers put the URI in front: `f"{uri.redacted()}: {error}"`.
    """


def read_secret_file(path: Path, what: str) -> bytes:
    """Return the first line of the secret file `path`, without its line break.

    `what` names the file in the message, for example `pin-source`. Raise
    `SecretFileError` when the file is missing or unreadable, is not a
    regular file (a FIFO, a device, a directory), is larger than
    `MAX_SECRET_FILE_BYTES`, or when the path contains a NUL byte.
    """
    try:
        data = read_small_file(path, MAX_SECRET_FILE_BYTES)
    except OSError as error:
        raise SecretFileError(
            f"cannot read {what} {_printable(path)}: {error.strerror}"
        ) from None
    lines = data.splitlines()
    return lines[0] if lines else b""


def _printable(path: Path) -> str:
    """Return `path` as text, quoted with escapes if it has a control byte.

    A NUL or a line break in a path would otherwise break the one-line error.
    """
    text = str(path)
    return text if text.isprintable() else repr(text)
