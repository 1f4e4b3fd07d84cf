"""The key directory: one TSS2 PRIVATE KEY PEM file per key name.

A key `mykey` is `mykey.pem` in `$XDG_CONFIG_HOME/kmsproxy/tpm` (by default
`~/.config/kmsproxy/tpm`), with its certificate chain in `mykey.crt` beside
it. The PEM holds the key wrapped by the TPM's storage key, so it is useless
on another machine. It is still written with mode 0600, in a 0700 directory,
because any user who can read it can use the key on this machine's TPM.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kmsproxy.cli.serve import config_directory

DIRECTORY_NAME = "tpm"
KEY_SUFFIX = ".pem"
CHAIN_SUFFIX = ".crt"

# Key files hold wrapped private keys and the directory lists them.
KEY_FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
# Certificates are public. Only the owner reaches them through the 0700
# directory, but a copy keeps the usual certificate mode.
CHAIN_FILE_MODE = 0o644

# A name becomes a file name: letters, digits, `.`, `_` and `-`, not starting
# with `.` (no hidden files, no `..`), and short enough for any file system.
# Always applied with fullmatch, because `$` would also accept a final "\n".
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def key_directory() -> Path:
    """Return the directory of named keys, which `XDG_CONFIG_HOME` moves."""
    return config_directory() / DIRECTORY_NAME


def check_name(name: str) -> str:
    """Return `name` if it can be a key name; raise `ValueError` otherwise."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid key name {name!r}: use up to 128 letters, digits, '.', '_' "
            "or '-', not starting with '.'"
        )
    return name


def key_path_for(name: str) -> Path:
    return key_directory() / f"{check_name(name)}{KEY_SUFFIX}"


def chain_path_for(key_path: Path) -> Path:
    """Return the chain file beside a key file: `mykey.pem` -> `mykey.crt`."""
    return key_path.with_suffix(CHAIN_SUFFIX)


def write_new_key(path: Path, pem: bytes) -> None:
    """Write a key file with mode 0600; raise `FileExistsError` if it exists."""
    path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    # mkdir leaves an existing directory's mode as it was.
    os.chmod(path.parent, DIRECTORY_MODE)
    # O_EXCL never replaces a key, and the mode applies from the first byte.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)


def replace_chain(path: Path, pem: bytes) -> None:
    """Write a chain file by rename, so a watcher never reads half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CHAIN_FILE_MODE
    )
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    os.replace(temporary, path)


def key_names() -> list[str]:
    """Return the names of the keys in the key directory, sorted."""
    directory = key_directory()
    if not directory.is_dir():
        return []
    return sorted(
        path.stem
        for path in directory.glob(f"*{KEY_SUFFIX}")
        if _NAME.fullmatch(path.stem) and path.is_file()
    )
