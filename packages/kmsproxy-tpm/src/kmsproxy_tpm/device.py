"""One connection per TPM, shared by every key on it, and its failures.

A `TPMDevice` owns the ESAPI context for one TCTI string. Every TPM call
goes through `TPMDevice.call`, which holds a thread lock (an ESAPI context
serves one caller at a time) and reopens the context after a failure that
broke it (the connection dropped or the TPM was reset).

Errors from tpm2-tss become `TPMError` with a sentence that says what to do;
`TPMUnavailable` marks the ones that may pass (TPM gone, busy, reset), which
the signer retries with the `tpm-reconnect` backoff. `TPMBusy` is the subset
from a TPM that still answers, so the context stays open. A message names
the TPM setting the way the user gave it: `URI_SYNTAX` (`tcti=` in a key
URI) or `OPTION_SYNTAX` (`--tcti` of a `kmsproxy tpm` command).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from kmsproxy.backoff import Backoff, BackoffPolicy

logger = logging.getLogger(__name__)

# tpm2-tss prints its own ERROR lines to stderr for every failed TCTI load
# or command, which would bury kmsproxy's one-line error. Silence them unless
# the user asked for them by setting TSS2_LOG (tpm2-tss reads it on first use).
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import ESAPI, TSS2_Exception  # noqa: E402 - after TSS2_LOG
from tpm2_pytss.constants import TPM2_RC, TSS2_RC  # noqa: E402

_T = TypeVar("_T")

# After the TPM fails, wait 0.5 s, then double up to 30 s between attempts
# to reopen it. A restarted resource manager or swtpm is back within a
# second; a TPM that stays away costs one failed attempt each 30 s.
RECONNECT_POLICY = BackoffPolicy(
    name="tpm-reconnect", initial=0.5, maximum=30.0, multiplier=2.0
)

# Maximum seconds a call waits for another call on the same TPM to finish.
# The TCTIs have no timeout, so a hung TPM holds the lock; without this
# bound, every thread queued behind it would hang too. The slowest single
# call expected is an RSA primary key on a slow hardware TPM, a few seconds.
DEVICE_WAIT_SECONDS = 15.0

# TPM response codes that mean "try again later": the TPM is busy with
# another command, testing itself, or short of memory for a moment.
_BUSY_CODES = frozenset(
    {
        int(TPM2_RC.RETRY),
        int(TPM2_RC.YIELDED),
        int(TPM2_RC.TESTING),
        int(TPM2_RC.CANCELED),
        int(TPM2_RC.NV_RATE),
        int(TPM2_RC.SESSION_MEMORY),
        int(TPM2_RC.MEMORY),
        int(TPM2_RC.CONTEXT_GAP),
    }
)

# The TPM has no free slot for another loaded object. Without a resource
# manager, objects that other programs left loaded stay there (libtpms,
# behind swtpm, has 3 slots), so waiting helps only if their owner flushes.
_OBJECT_SLOT_CODES = frozenset(
    {int(TPM2_RC.OBJECT_MEMORY), int(TPM2_RC.OBJECT_HANDLES)}
)

# Codes that mean the TPM lost its transient objects: a reset (TPM2_Startup
# CLEAR after a restart) or a handle that no longer exists.
_RESET_CODES = frozenset(
    {
        int(TPM2_RC.INITIALIZE),
        int(TPM2_RC.REFERENCE_H0),
        int(TPM2_RC.HANDLE),
        int(TPM2_RC.REBOOT),
    }
)

_AUTH_CODES = frozenset({int(TPM2_RC.BAD_AUTH), int(TPM2_RC.AUTH_FAIL)})

# The kernel's resource manager device, named in the fixes of errors.
DEFAULT_RESOURCE_MANAGER = "/dev/tpmrm0"

_TCTI_LAYER = int(TSS2_RC.TCTI_RC_LAYER)
_LAYER_MASK = int(TSS2_RC.RC_LAYER_MASK)
_BASE_MASK = 0xFFFF


class TPMError(Exception):
    """A TPM call failed. The message names the failure and the fix."""


class TPMUnavailable(TPMError):
    """The TPM cannot be reached or is busy; a later attempt may work."""


class TPMBusy(TPMUnavailable):
    """The TPM responded but cannot run the command now; the context stays open."""


@dataclass(frozen=True)
class SettingSyntax:
    """The syntax that names a TPM in an error's fix: URI attributes or options."""

    device_format: str
    tcti_format: str

    def device(self, path: str) -> str:
        return self.device_format.format(path)

    def tcti(self, tcti: str) -> str:
        return self.tcti_format.format(tcti)


# In a `tpmkms:` key URI (serve, csr, init --key).
URI_SYNTAX = SettingSyntax(device_format="device={}", tcti_format="tcti={}")

# In the options of a `kmsproxy tpm` command.
OPTION_SYNTAX = SettingSyntax(device_format="--device {}", tcti_format="--tcti {}")

# The TCTI of the swtpm emulator on its default port, for examples.
SWTPM_EXAMPLE_TCTI = "swtpm:host=127.0.0.1,port=2321"


class TPMAuthError(TPMError):
    """The key's auth value is wrong or missing."""


def describe_tss_error(
    error: TSS2_Exception, tcti: str, syntax: SettingSyntax = URI_SYNTAX
) -> TPMError:
    """Turn a tpm2-tss error into a `TPMError` naming the TCTI and the fix."""
    rc = int(error.rc)
    layer = rc & _LAYER_MASK
    base = rc & _BASE_MASK
    code = int(error.error)
    if layer == _TCTI_LAYER:
        if base in (
            int(TSS2_RC.BASE_RC_NOT_IMPLEMENTED),
            int(TSS2_RC.BASE_RC_NOT_SUPPORTED),
            int(TSS2_RC.BASE_RC_BAD_VALUE),
            int(TSS2_RC.BASE_RC_BAD_REFERENCE),
        ):
            return TPMError(
                f"cannot load the TCTI {tcti!r} ({error}): check its name and "
                "options (device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321, "
                "tabrmd) and that its library, libtss2-tcti-NAME, is installed"
            )
        if base == int(TSS2_RC.BASE_RC_TRY_AGAIN):
            return TPMBusy(f"the TPM at {tcti} is busy ({error})")
        return TPMUnavailable(
            f"cannot talk to the TPM at {tcti} ({error}): check that the TPM "
            "or its resource manager is running"
        )
    if layer == 0 and code in _AUTH_CODES:
        return TPMAuthError(
            "the TPM rejected the key's auth value: give the right one with "
            "pin-value= or pin-source="
        )
    if layer == 0 and code == int(TPM2_RC.LOCKOUT):
        return TPMError(
            f"the TPM at {tcti} is in dictionary-attack lockout: wait for it to "
            "expire, or reset it with `tpm2_dictionarylockout --clear-lockout`"
        )
    if layer == 0 and code in _BUSY_CODES:
        return TPMBusy(f"the TPM at {tcti} is busy ({error})")
    if layer == 0 and code in _OBJECT_SLOT_CODES:
        return TPMBusy(
            f"the TPM at {tcti} has no free slot for a loaded object ({error}). "
            "Without a resource manager, objects that other programs loaded "
            "stay in the TPM: unload them with `tpm2_flushcontext -t`, or use "
            f"a resource manager ({syntax.device(DEFAULT_RESOURCE_MANAGER)} or "
            f"{syntax.tcti('tabrmd')})"
        )
    if layer == 0 and code in _RESET_CODES:
        return TPMUnavailable(
            f"the TPM at {tcti} was reset and lost the loaded key ({error}); "
            "reloading it"
        )
    return TPMError(f"the TPM at {tcti} failed: {error}")


def check_device_path(tcti: str, syntax: SettingSyntax = URI_SYNTAX) -> None:
    """Raise `TPMError` when a `device:` TCTI names a file that cannot be opened.

    tpm2-tss reports every failure to open the device as "IO failure", so
    the errno is read here to tell a missing TPM from a permission problem
    or a device that another program holds.
    """
    name, _, path = tcti.partition(":")
    if name != "device" or not path:
        return
    try:
        # A FIFO or another odd file would block open(); a TPM is a
        # character device.
        if not stat.S_ISCHR(os.stat(path).st_mode):
            raise TPMError(
                f"{path} is not a TPM character device: give the TPM with "
                f"{syntax.device(DEFAULT_RESOURCE_MANAGER)}"
            )
        descriptor = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except OSError as error:
        raise _device_open_error(path, error, syntax) from None
    os.close(descriptor)


def _device_open_error(path: str, error: OSError, syntax: SettingSyntax) -> TPMError:
    if error.errno == errno.ENOENT:
        where = (
            "KMSPROXY_TPM_TCTI for a key file given by path"
            if syntax is URI_SYNTAX
            else "set KMSPROXY_TPM_TCTI"
        )
        return TPMError(
            f"no TPM found at {path}: enable the TPM in the firmware, or choose "
            f"another TPM with {syntax.tcti('TCTI')} (for example "
            f"{syntax.tcti(SWTPM_EXAMPLE_TCTI)} for swtpm) or {where}"
        )
    if error.errno == errno.EACCES:
        return TPMError(
            f"permission denied on {path}: add your user to the tss group "
            "(`sudo usermod -aG tss $USER`, then log in again)"
        )
    if error.errno == errno.EBUSY:
        return TPMUnavailable(
            f"{path} is in use by another program: use a resource manager "
            f"({syntax.device(DEFAULT_RESOURCE_MANAGER)} or "
            f"{syntax.tcti('tabrmd')}) instead"
        )
    return TPMUnavailable(f"cannot open {path}: {error.strerror}")


class TPMDevice:
    """The ESAPI context for one TCTI, opened on first use and after failures.

    Thread-safe: `call` runs one function at a time against the context.
    """

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self.backoff = Backoff(RECONNECT_POLICY, f"TPM {tcti}")
        # Why the last attempt failed, for errors raised while backing off.
        self.last_failure = "the TPM is unavailable"
        self._lock = threading.Lock()
        self._context: Any = None
        self._users_lock = threading.Lock()
        self._users = 0
        self._limiter: tuple[object, anyio.CapacityLimiter] | None = None

    def limiter(self) -> anyio.CapacityLimiter:
        """Return the one-token limiter for this TPM in the running event loop.

        A limiter belongs to one event loop, and a process (a test session)
        may run several loops one after another, so a new loop gets a new one.
        """
        token: object
        try:
            token = anyio.lowlevel.current_token()
        except RuntimeError:
            # Outside any event loop (a command, a synchronous test).
            token = None
        if self._limiter is None or self._limiter[0] != token:
            self._limiter = (token, anyio.CapacityLimiter(1))
        return self._limiter[1]

    def call(self, function: Callable[[Any], _T]) -> _T:
        """Run `function(esapi)` with the context open and locked.

        Raise `TPMError`. After a `TPMUnavailable` other than `TPMBusy` the
        context is closed, so the next call opens a new one. A `TPMBusy` TPM
        keeps what it loaded, so the context stays open.
        """
        # NOTE: the device and swtpm TCTIs of tpm2-tss 3.2 wait for a response
        # without a timeout, so a TPM that stops responding but keeps the
        # connection open holds this lock until it responds. Callers queued
        # behind it give up after DEVICE_WAIT_SECONDS.
        if not self._lock.acquire(timeout=DEVICE_WAIT_SECONDS):
            raise TPMUnavailable(
                f"the TPM at {self.tcti} did not finish the previous command "
                f"within {DEVICE_WAIT_SECONDS:g} s: check that the TPM or its "
                "resource manager responds"
            )
        try:
            context = self._open_locked()
            try:
                return function(context)
            except TSS2_Exception as error:
                described = describe_tss_error(error, self.tcti)
                if isinstance(described, TPMUnavailable) and not isinstance(
                    described, TPMBusy
                ):
                    self._close_locked()
                raise described from None
        finally:
            self._lock.release()

    def _open_locked(self) -> Any:
        if self._context is not None:
            return self._context
        check_device_path(self.tcti)
        try:
            context = ESAPI(self.tcti)
        except TSS2_Exception as error:
            raise describe_tss_error(error, self.tcti) from None
        except RuntimeError as error:
            # tpm2-pytss raises RuntimeError for a string that is not NAME:CONF.
            raise TPMError(f"invalid TCTI {self.tcti!r}: {error}") from None
        self._context = context
        logger.debug("Opened TPM tcti=%s", self.tcti)
        return context

    def _close_locked(self) -> None:
        context, self._context = self._context, None
        if context is None:
            return
        try:
            context.close()
        except TSS2_Exception as error:
            logger.debug("Closing the TPM context failed tcti=%s: %s", self.tcti, error)

    def acquire(self) -> None:
        with self._users_lock:
            self._users += 1

    def release(self) -> bool:
        """Drop one user; close the context after the last. Return if closed.

        Closing sends no TPM command. If a hung TPM still holds the lock
        after DEVICE_WAIT_SECONDS, the context is left to the process exit.
        """
        with self._users_lock:
            self._users -= 1
            if self._users > 0:
                return False
        if not self._lock.acquire(timeout=DEVICE_WAIT_SECONDS):
            logger.warning(
                "TPM still busy at close, leaving its connection open tcti=%s",
                self.tcti,
            )
            return True
        try:
            self._close_locked()
        finally:
            self._lock.release()
        return True


_devices: dict[str, TPMDevice] = {}
_devices_lock = threading.Lock()


def acquire_device(tcti: str) -> TPMDevice:
    """Return the shared device for `tcti`, counting one more user."""
    with _devices_lock:
        device = _devices.get(tcti)
        if device is None:
            device = _devices[tcti] = TPMDevice(tcti)
        device.acquire()
        return device


def release_device(device: TPMDevice) -> None:
    """Drop one user; after the last, close the TPM and forget the device."""
    with _devices_lock:
        if device.release() and _devices.get(device.tcti) is device:
            del _devices[device.tcti]


def open_context(tcti: str, syntax: SettingSyntax = OPTION_SYNTAX) -> ESAPI:
    """Open a private ESAPI context for a command-line tool; raise `TPMError`."""
    check_device_path(tcti, syntax)
    try:
        return ESAPI(tcti)
    except TSS2_Exception as error:
        raise describe_tss_error(error, tcti, syntax) from None
    except RuntimeError as error:
        raise TPMError(f"invalid TCTI {tcti!r}: {error}") from None
