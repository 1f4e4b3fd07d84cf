"""PKCS#11 module locations, and loading a module once per process.

`module-path=` takes a file path or one of the names in `KNOWN_MODULES`
(`softhsm2`, `opensc`, `ykcs11`, `p11-kit-proxy`). A name is looked up in the
places the operating system's packages install that module, and the first
match wins. A relative path is made absolute.

A loaded module is shared by every token and key in the process, because a
PKCS#11 library is initialised once per process (`C_Initialize`).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pkcs11
from pkcs11.exceptions import PKCS11Error

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Library

logger = logging.getLogger(__name__)

# Install locations per module name and platform, most common first:
# Debian/Ubuntu multiarch directories, Fedora/RHEL lib64, Alpine/Arch /usr/lib,
# then Homebrew on Apple silicon and Intel and the vendor installers on macOS.
KNOWN_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "softhsm2": {
        "linux": (
            "/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/lib64/pkcs11/libsofthsm2.so",
            "/usr/lib/pkcs11/libsofthsm2.so",
            "/usr/local/lib/softhsm/libsofthsm2.so",
        ),
        "darwin": (
            "/opt/homebrew/lib/softhsm/libsofthsm2.so",
            "/usr/local/lib/softhsm/libsofthsm2.so",
        ),
    },
    "opensc": {
        "linux": (
            "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
            "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so",
            "/usr/lib64/opensc-pkcs11.so",
            "/usr/lib/opensc-pkcs11.so",
        ),
        "darwin": (
            "/Library/OpenSC/lib/opensc-pkcs11.so",
            "/opt/homebrew/lib/opensc-pkcs11.so",
            "/usr/local/lib/opensc-pkcs11.so",
        ),
    },
    "ykcs11": {
        "linux": (
            "/usr/lib/x86_64-linux-gnu/libykcs11.so",
            "/usr/lib/aarch64-linux-gnu/libykcs11.so",
            "/usr/lib64/libykcs11.so",
            "/usr/lib/libykcs11.so",
            "/usr/local/lib/libykcs11.so",
            # Debian installs only the versioned name without the -dev package.
            "/usr/lib/x86_64-linux-gnu/libykcs11.so.2",
            "/usr/lib/aarch64-linux-gnu/libykcs11.so.2",
            "/usr/lib64/libykcs11.so.2",
        ),
        "darwin": (
            "/opt/homebrew/lib/libykcs11.dylib",
            "/usr/local/lib/libykcs11.dylib",
        ),
    },
    "p11-kit-proxy": {
        "linux": (
            "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
            "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
            "/usr/lib64/p11-kit-proxy.so",
            "/usr/lib/p11-kit-proxy.so",
        ),
        "darwin": (
            "/opt/homebrew/lib/p11-kit-proxy.so",
            "/usr/local/lib/p11-kit-proxy.so",
        ),
    },
}


class ModuleError(Exception):
    """A PKCS#11 module could not be found or loaded; the message names the cause."""


def platform_key() -> str:
    """Return the `KNOWN_MODULES` platform key for this system."""
    return "darwin" if sys.platform == "darwin" else "linux"


def candidate_paths(name: str) -> Sequence[str]:
    """Return where module `name` may be installed on this platform."""
    return KNOWN_MODULES.get(name, {}).get(platform_key(), ())


def find_known_module(name: str) -> Path | None:
    """Return the first installed path of module `name`, or None."""
    for candidate in candidate_paths(name):
        if Path(candidate).exists():
            return Path(candidate)
    return None


def resolve_module_path(text: str, setting: str = "module-path=") -> Path:
    """Turn a `module-path=` value (a path or a known name) into a path.

    Raise `ModuleError` naming the places searched when nothing is there.
    `setting` is how the user gave the value (`--module-path` on a command
    line), which the message names.
    """
    if text in KNOWN_MODULES:
        found = find_known_module(text)
        if found is None:
            searched = ", ".join(candidate_paths(text)) or "no known location"
            raise ModuleError(
                f"PKCS#11 module {text} not found (searched {searched}); "
                f"install it or give its file as {setting}"
            )
        return found
    # Absolute, so that dlopen loads this file rather than searching the
    # library path for a bare name such as libfoo.so.
    path = Path(text).expanduser().absolute()
    if not path.exists():
        known = ", ".join(KNOWN_MODULES)
        raise ModuleError(
            f"PKCS#11 module {path} not found; give the module's file or "
            f"one of {known} as {setting}"
        )
    return path


class Module:
    """One loaded PKCS#11 library, shared by every token it serves.

    python-pkcs11 calls `C_Initialize` without arguments, which promises
    the module that the application will not call it from several threads at
    once (PKCS#11 v2.40 section 5.4). Every call into the module therefore
    holds `lock`, even calls for different tokens.

    `generation` counts re-initialisations (`C_Finalize` and
    `C_Initialize`), which invalidate every session opened before. A token
    compares the generation it opened with against this one before each
    call.
    """

    def __init__(self, path: Path, library: Library) -> None:
        self.path = path
        self.library = library
        self.generation = 0
        self.lock = threading.RLock()
        self._reinitialized_at: float | None = None

    def seconds_since_reinitialize(self) -> float:
        """Return the seconds since the last `reinitialize` (inf if never)."""
        if self._reinitialized_at is None:
            return math.inf
        return time.monotonic() - self._reinitialized_at

    def reinitialize(self) -> None:
        """Finalize and initialise the library so it rescans its tokens.

        Some modules (SoftHSM2 among them) only notice a token directory
        that came back after this. Every open session becomes invalid.
        """
        with self.lock:
            try:
                self.library.finalize()
            except PKCS11Error as error:
                # python-pkcs11 marks the library finalized even when
                # C_Finalize fails (SoftHSM2 does after its token directory
                # vanished), so initialising again is still right.
                logger.debug(
                    "C_Finalize failed module=%s error=%s",
                    self.path,
                    type(error).__name__,
                )
            self.library.initialize()
            self.generation += 1
            self._reinitialized_at = time.monotonic()
        logger.info("PKCS#11 module re-initialised module=%s", self.path)


# Keyed by the module's resolved file.
_modules: dict[Path, Module] = {}
_modules_lock = threading.Lock()


def load_module(path: Path) -> Module:
    """Load (once per process) and initialise the module at `path`.

    Modules are shared by their resolved file, so a symbolic link and its
    target (ykcs11's libykcs11.so and libykcs11.so.2) load one library,
    which a second C_Initialize would reject. The module keeps the first
    path it was loaded by, for messages and listings.
    """
    real = path.resolve()
    with _modules_lock:
        module = _modules.get(real)
        if module is not None:
            return module
        try:
            library = pkcs11.lib(str(path))
        except PKCS11Error as error:
            raise ModuleError(
                f"cannot load PKCS#11 module {path}: {error or type(error).__name__}"
                + _load_hint(str(error))
            ) from None
        module = Module(path, library)
        _modules[real] = module
        logger.debug(
            "PKCS#11 module loaded module=%s manufacturer=%r description=%r",
            path,
            library.manufacturer_id,
            library.library_description,
        )
        return module


def _load_hint(message: str) -> str:
    """Return what a dlopen or dlsym failure most likely means."""
    if "ELF" in message:
        # "wrong ELF class: ELFCLASS32", "invalid ELF header"
        return " (is it a PKCS#11 library built for this CPU architecture?)"
    if "C_GetFunctionList" in message:
        return " (the file is a library, but not a PKCS#11 module)"
    return ""
