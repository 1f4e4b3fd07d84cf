"""The user PIN: reading it, and describing the token's PIN flags.

The PIN is read from `pin-source` (a file, re-read at each login so a
rotated PIN is picked up) or `pin-value`. It never appears in a log line or
an exception message. A `pin-source` file that group or others may read is
logged once, at WARNING, as ssh does for private keys. `token` remembers a
rejected PIN by its SHA-256 only, so the same wrong PIN is never sent again
(a YubiKey locks its PIN after 3 wrong tries), and a changed PIN is tried
once.
"""

from __future__ import annotations

import hashlib
import logging
import stat
import threading
from pathlib import Path

from pkcs11 import TokenFlag

from kmsproxy.secrets import SecretFileError, read_secret_file
from kmsproxy.signer import SignerError

from .address import PinSource

logger = logging.getLogger(__name__)

# The pin-source files already reported as readable by group or others.
_warned_paths: set[Path] = set()
_warned_paths_lock = threading.Lock()


def read_pin(source: PinSource, uri: str) -> str | None:
    """Return the PIN (the first line of a pin-source file), or None."""
    if source.value is not None:
        return source.value
    if source.path is None:
        return None
    try:
        line = read_secret_file(source.path, "pin-source")
    except SecretFileError as error:
        raise SignerError(f"{uri}: {error}") from None
    try:
        pin = line.decode("utf-8")
    except UnicodeDecodeError:
        raise SignerError(
            f"{uri}: pin-source {source.path} is not UTF-8 text"
        ) from None
    _warn_if_readable(source.path)
    if not pin:
        raise SignerError(
            f"{uri}: pin-source {source.path} is empty; write the PIN on its first line"
        )
    return pin


def _warn_if_readable(path: Path) -> None:
    """Log once when users other than the owner may read the PIN file."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return
    with _warned_paths_lock:
        if path in _warned_paths:
            return
        _warned_paths.add(path)
    logger.warning(
        "pin-source is readable by group or others path=%s mode=%04o; "
        "run chmod 600 on it",
        path,
        mode,
    )


def pin_fingerprint(pin: str) -> str:
    """Return a SHA-256 of the PIN, to recognise a rejected PIN again."""
    return hashlib.sha256(pin.encode("utf-8")).hexdigest()


def describe_pin_state(flags: TokenFlag) -> str:
    """Describe the PIN's remaining tries from the token's flags.

    PKCS#11 reports no count, only CKF_USER_PIN_COUNT_LOW (a wrong PIN was
    entered since the last login), CKF_USER_PIN_FINAL_TRY and
    CKF_USER_PIN_LOCKED. The result is empty when none is set.
    """
    if flags & TokenFlag.USER_PIN_LOCKED:
        return (
            "the PIN is locked; unblock it with the PUK or the security "
            "officer PIN before trying again"
        )
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        return "one try remains before the PIN locks"
    if flags & TokenFlag.USER_PIN_COUNT_LOW:
        return "a wrong PIN was entered since the last login, so fewer tries remain"
    return ""
