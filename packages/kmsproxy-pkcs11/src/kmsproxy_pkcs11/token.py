"""One open token: its session, login state, limiter and reconnect backoff.

Every key and certificate on one token shares one `TokenSession`, because
python-pkcs11 sessions are not thread-safe and PKCS#11 keeps the login state
per application, not per session. `acquire_token` looks the token up before
it opens anything, so a second user of a token never opens a session of its
own. Calls reach the session only through `TokenSession.run`, under the
module's lock, from the worker thread that the shared `limiter` admits (or
from the event loop's thread at startup). The token thus does one operation
at a time while tunnels that need no signature keep flowing.

When the token goes away (CKR_DEVICE_REMOVED, CKR_SESSION_HANDLE_INVALID,
CKR_TOKEN_NOT_PRESENT, or a key handle that became invalid), the session is
dropped and the failure goes to the `pkcs11-reconnect` backoff. Calls then
fail at once with "token not present" until the delay passes. After it, one
call looks for the token again, opens a new session and logs in.
`kmsproxy.backoff` logs the loss and the return once each.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import anyio
import pkcs11
from pkcs11 import Attribute, Mechanism, Token, TokenFlag
from pkcs11 import exceptions as p11
from pkcs11.attributes import AttributeMapper

from kmsproxy.backoff import Backoff, BackoffPolicy
from kmsproxy.signer import SignerError

from .address import PinSource, TokenSelector
from .modules import Module
from .pin import describe_pin_state, pin_fingerprint, read_pin

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Reopening a token costs a slot scan and a login. A pulled YubiKey or a
# restarted HSM client usually returns within seconds, so the first retry
# comes after 0.5 s; 30 s caps the wait so a returned token is used soon.
RECONNECT_POLICY = BackoffPolicy("pkcs11-reconnect", initial=0.5, maximum=30.0)

# Return values meaning the token or its session is gone, not that the
# request was wrong. SoftHSM2 returns CKR_OBJECT_HANDLE_INVALID and then
# CKR_GENERAL_ERROR when its token directory disappears.
TOKEN_GONE_ERRORS: tuple[type[p11.PKCS11Error], ...] = (
    p11.DeviceRemoved,
    p11.DeviceError,
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
    p11.UserNotLoggedIn,
    p11.GeneralError,
)

# While other tokens of the same module have sessions open, a lost token
# re-initialises the module at most once in this many seconds, because
# C_Finalize ends every other token's session and login. The value is the
# backoff's maximum delay, so a returned token is still seen within about
# two maximum delays.
SHARED_MODULE_REINITIALIZE_SECONDS = RECONNECT_POLICY.maximum

# The phrase that every "token is away" error contains, for users and tests.
NOT_PRESENT = "token not present"

# CK_ULONG, the C unsigned long that PKCS#11 arrays are made of.
_ULONG = struct.Struct("L")


def attribute_mapper() -> AttributeMapper:
    """Return python-pkcs11's mapper, taught CKA_ALLOWED_MECHANISMS.

    The attribute is an array of CK_MECHANISM_TYPE (the platform's unsigned
    long), which python-pkcs11 0.10 does not decode itself.
    """
    mapper = AttributeMapper()

    def pack(mechanisms: list[Mechanism]) -> bytes:
        return b"".join(_ULONG.pack(int(m)) for m in mechanisms)

    def unpack(data: bytes) -> list[Mechanism | int]:
        end = len(data) - len(data) % _ULONG.size
        return [
            _as_mechanism(_ULONG.unpack_from(data, offset)[0])
            for offset in range(0, end, _ULONG.size)
        ]

    mapper.register_handler(Attribute.ALLOWED_MECHANISMS, pack, unpack)
    return mapper


def _as_mechanism(value: int) -> Mechanism | int:
    try:
        return Mechanism(value)
    except ValueError:
        return value


class TokenMissing(SignerError):
    """No token matches the selector (removed, or never there)."""


def _token_serial(token: Token) -> str:
    return bytes(token.serial).decode("ascii", errors="replace").strip()


def describe_token(token: Token) -> str:
    """Return `token 'dev' (serial 1a2b...)` for messages."""
    return f"token {token.label!r} (serial {_token_serial(token) or 'none'})"


def find_token(module: Module, selector: TokenSelector) -> Token:
    """Return the one token `selector` matches; raise `TokenMissing` otherwise.

    Without label, serial or slot id, the module must hold exactly one
    initialised token.
    """
    try:
        slots = module.library.get_slots(token_present=True)
    except TOKEN_GONE_ERRORS as error:
        raise TokenMissing(
            f"module {module.path} lists no slots ({return_value_name(error)})"
        ) from None
    matches = []
    for slot in slots:
        if selector.slot_id is not None and slot.slot_id != selector.slot_id:
            continue
        try:
            token = slot.get_token()
        except TOKEN_GONE_ERRORS:
            continue
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue
        if selector.label is not None and token.label != selector.label:
            continue
        if selector.label_prefix is not None and not token.label.startswith(
            selector.label_prefix
        ):
            continue
        if selector.serial is not None and _token_serial(token) != selector.serial:
            continue
        matches.append(token)
    if not matches:
        raise TokenMissing(
            f"{NOT_PRESENT}: no token matches {selector.describe()} in "
            f"module {module.path}"
        )
    if len(matches) > 1:
        found = ", ".join(describe_token(t) for t in matches)
        raise SignerError(
            f"{len(matches)} tokens match {selector.describe()} in module "
            f"{module.path}: {found}; add token= or serial= to pick one"
        )
    match: Token = matches[0]
    return match


_REOPEN_ERRORS: tuple[type[Exception], ...] = (TokenMissing, *TOKEN_GONE_ERRORS)


def with_uri(uri: str, error: Exception) -> str:
    """Return the error's message, starting with `uri` once."""
    text = str(error)
    return text if text.startswith(uri) else f"{uri}: {text}"


def return_value_name(error: p11.PKCS11Error) -> str:
    """Name a python-pkcs11 error the way PKCS#11 does (CKR_DEVICE_REMOVED)."""
    name = type(error).__name__
    words = []
    for index, char in enumerate(name):
        if char.isupper() and index and not name[index - 1].isupper():
            words.append("_")
        words.append(char.upper())
    text = "".join(words)
    return f"CKR_{text}" + (f": {error}" if str(error) else "")


@dataclass(frozen=True)
class TokenKey:
    """The identity of an opened token, for sharing one session per token."""

    module_path: Path
    label: str
    serial: str


def token_key(module: Module, token: Token) -> TokenKey:
    """Return the identity of `token` in `module`."""
    return TokenKey(module.path, token.label, _token_serial(token))


# The SHA-256 of the last PIN each token rejected. It is kept per token, not
# per session, so a reopened session, a second key on the token and a
# per-signature login all refuse to send that PIN again.
_rejected_pins: dict[TokenKey, str] = {}
_rejected_pins_lock = threading.Lock()


def pin_was_rejected(key: TokenKey, pin: str) -> bool:
    """Return True when `key`'s token has rejected exactly this PIN."""
    with _rejected_pins_lock:
        return _rejected_pins.get(key) == pin_fingerprint(pin)


def record_rejected_pin(key: TokenKey, pin: str) -> None:
    """Remember that `key`'s token rejected `pin` (by its SHA-256 only)."""
    with _rejected_pins_lock:
        _rejected_pins[key] = pin_fingerprint(pin)


def rejected_pin_message(uri: str) -> str:
    """Return the error for a PIN that the token rejected before."""
    return (
        f"{uri}: the token rejected this PIN before, so kmsproxy does not send "
        "it again; correct pin-source or pin-value"
    )


class TokenSession:
    """The session on one token, reopened after the token comes back."""

    def __init__(
        self,
        module: Module,
        selector: TokenSelector,
        pin: PinSource,
        uri: str,
        *,
        need_login: bool = True,
    ) -> None:
        self.module = module
        self.need_login = need_login
        self.selector = selector
        self.pin = pin
        self.uri = uri
        self.limiter = anyio.CapacityLimiter(1)
        self.backoff = Backoff(RECONNECT_POLICY, uri)
        # Incremented at each new session, so holders of object handles
        # know theirs are stale.
        self.session_number = 0
        self.users = 0
        self.token: Token | None = None
        self.key: TokenKey | None = None
        self._session: pkcs11.Session | None = None
        self._generation = -1
        self._logged_in = False
        # The SHA-256 of the PIN that the current login used, if any.
        self._login_pin: str | None = None
        # One lock per module, not per token: see `Module`.
        self._lock = module.lock
        self._mapper = attribute_mapper()

    @property
    def logged_in(self) -> bool:
        return self._logged_in

    @property
    def has_session(self) -> bool:
        """True while a session of the module's current generation is open."""
        return self._session is not None and self._generation == self.module.generation

    def open(self) -> TokenKey:
        """Find the token, open a session and log in (at startup).

        Raise `SignerError` naming what to add or fix.
        """
        with self._lock:
            self._open_session()
            assert self.key is not None
            return self.key

    def require_login(self, pin: PinSource, need_login: bool) -> None:
        """Log in with `pin` if no earlier user of this token did.

        When the token is logged in already, a PIN that differs from the
        one used for that login raises `SignerError`, because PKCS#11 has one
        login per application and token, so the second PIN would go unchecked.
        """
        with self._lock:
            if self._logged_in:
                self._check_same_pin(pin)
                return
            if not (pin.given or need_login):
                return
            self.pin = pin
            self.need_login = self.need_login or need_login
            self._close_session()
            self._open_session()

    def run(self, operation: Callable[[pkcs11.Session], _T]) -> _T:
        """Run `operation` on the session, reopening it when it is gone.

        Call from one thread at a time per token (the limiter's worker, or
        the event loop at startup). Raise `SignerError` with "token not
        present" while the token is away. Close the session and re-raise on
        any other PKCS#11 error, because a failed C_Login or C_Sign may leave
        its operation active, and every later call would then fail with
        CKR_OPERATION_ACTIVE. The next call opens a new session.
        """
        with self._lock:
            if self._session is not None and not self.has_session:
                # Another token's recovery re-initialised the module and
                # invalidated this handle. The module may have given the same
                # number to a new session since, so this one is not closed.
                self._forget_session()
            if self._session is None:
                self._reopen()
            assert self._session is not None
            try:
                result = operation(self._session)
            except TOKEN_GONE_ERRORS as error:
                self._close_session()
                reason = return_value_name(error)
                self.backoff.record_failure(reason)
                raise SignerError(
                    f"{self.uri}: {NOT_PRESENT} ({reason}); "
                    f"{self.backoff.waiting_message()}"
                ) from None
            except p11.PKCS11Error:
                self._close_session()
                raise
            self.backoff.record_success()
            return result

    async def run_async(self, operation: Callable[[pkcs11.Session], _T]) -> _T:
        """Run `operation` in a worker thread behind this token's limiter."""
        return await anyio.to_thread.run_sync(self.run, operation, limiter=self.limiter)

    def close(self) -> None:
        with self._lock:
            self._close_session()

    def _check_same_pin(self, pin: PinSource) -> None:
        # The same pin-source file passes even when its content changed since
        # the login, so a reload after a PIN change keeps working.
        if not pin.given or self._login_pin is None or pin == self.pin:
            return
        text = read_pin(pin, self.uri)
        if text is not None and pin_fingerprint(text) != self._login_pin:
            raise SignerError(
                f"{self.uri}: another URI for {self.selector.describe()} logged "
                "in with a different PIN, and PKCS#11 keeps one login per token; "
                "give every URI for this token the same pin-source or pin-value"
            )

    def _reopen(self) -> None:
        """Open a new session after a loss, honouring the backoff."""
        if not self.backoff.ready():
            raise SignerError(
                f"{self.uri}: {NOT_PRESENT}; {self.backoff.waiting_message()}"
            )
        try:
            self._open_session()
        except _REOPEN_ERRORS as first:
            if not self._may_reinitialize():
                self._reopen_failed(first)
            # Some modules (SoftHSM2) see a returned token only after
            # C_Finalize and C_Initialize.
            try:
                self.module.reinitialize()
                self._open_session()
            except _REOPEN_ERRORS as error:
                self._reopen_failed(error)
        except SignerError as error:
            self.backoff.record_failure(_without_uri(self.uri, error))
            raise

    def _reopen_failed(self, error: Exception) -> NoReturn:
        self.backoff.record_failure(_without_uri(self.uri, error))
        raise SignerError(
            f"{self.uri}: {NOT_PRESENT}; {self.backoff.waiting_message()}"
        ) from None

    def _may_reinitialize(self) -> bool:
        """Return whether re-initialising the module now is worth its cost."""
        with _sessions_lock:
            others = any(
                session is not self
                and session.module is self.module
                and session.has_session
                for session in _sessions.values()
            )
        if not others:
            return True
        return self.module.seconds_since_reinitialize() >= (
            SHARED_MODULE_REINITIALIZE_SECONDS
        )

    def _open_session(self) -> None:
        generation = self.module.generation
        token = find_token(self.module, self.selector)
        key = token_key(self.module, token)
        pin = read_pin(self.pin, self.uri)
        login_required = bool(token.flags & TokenFlag.LOGIN_REQUIRED)
        if pin is None and login_required and self.need_login:
            if token.flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH:
                session = self._login(key, token, pkcs11.PROTECTED_AUTH)
            else:
                raise SignerError(
                    f"{self.uri}: {describe_token(token)} requires a PIN; add "
                    "?pin-source=/path/to/pin-file (first line is the PIN) or "
                    "?pin-value=PIN to the URI"
                )
            logged_in = True
        elif pin is None:
            session = token.open(attribute_mapper=self._mapper)
            logged_in = False
        else:
            session = self._login(key, token, pin)
            logged_in = True
        self.token = token
        self.key = key
        self._session = session
        self._generation = generation
        self._logged_in = logged_in
        self._login_pin = pin_fingerprint(pin) if pin is not None else None
        self.session_number += 1
        logger.debug(
            "PKCS#11 session opened token=%r module=%s logged_in=%s",
            token.label,
            self.module.path,
            self._logged_in,
        )

    def _login(self, key: TokenKey, token: Token, pin: str | object) -> pkcs11.Session:
        if isinstance(pin, str) and pin_was_rejected(key, pin):
            raise SignerError(rejected_pin_message(self.uri))
        try:
            # NOTE: python-pkcs11 0.10 opens the session before C_Login and
            # does not close it when the login fails, so each rejected PIN
            # leaves one session open until the module is finalized.
            return token.open(user_pin=pin, attribute_mapper=self._mapper)
        except p11.UserAlreadyLoggedIn:
            # Login state belongs to the application: a session outside
            # `acquire_token` (the test helpers, say) logged in, and a new
            # session shares that state. The failed open leaks one session
            # (see above), so `acquire_token` shares sessions to avoid this.
            return token.open(attribute_mapper=self._mapper)
        except p11.PinIncorrect:
            assert isinstance(pin, str)
            record_rejected_pin(key, pin)
            state = self._pin_state(token)
            raise SignerError(
                f"{self.uri}: wrong PIN for {describe_token(token)}"
                + (f"; {state}" if state else "")
                + "; correct pin-source or pin-value (kmsproxy never retries "
                "a wrong PIN)"
            ) from None
        except p11.PinLocked:
            raise SignerError(
                f"{self.uri}: the PIN of {describe_token(token)} is locked; "
                "unblock it with the PUK or the security officer PIN"
            ) from None
        except (p11.PinExpired, p11.PinInvalid, p11.PinLenRange) as error:
            raise SignerError(
                f"{self.uri}: {describe_token(token)} rejected the PIN "
                f"({return_value_name(error)}); set a valid PIN in pin-source or "
                "pin-value"
            ) from None

    def _pin_state(self, token: Token) -> str:
        """Re-read the token's flags after a failed login and describe them."""
        try:
            fresh = token.slot.get_token()
        except p11.PKCS11Error:
            return ""
        return describe_pin_state(fresh.flags)

    def _forget_session(self) -> None:
        """Drop the session without C_CloseSession (its handle is stale)."""
        self._session = None
        self._logged_in = False
        self._login_pin = None

    def _close_session(self) -> None:
        if not self.has_session:
            self._forget_session()
            return
        session = self._session
        self._forget_session()
        assert session is not None
        try:
            session.close()
        except p11.PKCS11Error as error:
            # The session is often already gone with the token; nothing to do.
            logger.debug(
                "PKCS#11 session close failed token_uri=%s error=%s",
                self.uri,
                return_value_name(error),
            )


def _without_uri(uri: str, error: Exception) -> str:
    """Return the error's message without a leading `uri: `."""
    return str(error).removeprefix(uri).removeprefix(": ")


_sessions: dict[TokenKey, TokenSession] = {}
_sessions_lock = threading.Lock()


def acquire_token(
    module: Module,
    selector: TokenSelector,
    pin: PinSource,
    uri: str,
    *,
    need_login: bool = True,
) -> TokenSession:
    """Open the token `selector` names, or share the session already open.

    The token is identified first, and a session already open on it is
    shared: a second C_OpenSession with a PIN would fail with
    CKR_USER_ALREADY_LOGGED_IN and leak a session (see `TokenSession._login`).
    `need_login` is False for a user that reads only public objects
    (certificates). Each call must be paired with `release_token`.
    """
    # The module's lock keeps two threads from opening the same token twice.
    with module.lock:
        key = token_key(module, find_token(module, selector))
        with _sessions_lock:
            existing = _sessions.get(key)
            if existing is not None:
                existing.users += 1
        if existing is not None:
            try:
                existing.require_login(pin, need_login)
            except BaseException:
                release_token(existing)
                raise
            return existing
        candidate = TokenSession(module, selector, pin, uri, need_login=need_login)
        opened = candidate.open()
        with _sessions_lock:
            _sessions[opened] = candidate
            candidate.users = 1
        return candidate


def release_token(session: TokenSession) -> None:
    """Drop one user of `session`; close it when none is left."""
    with _sessions_lock:
        session.users -= 1
        if session.users > 0:
            return
        for key, value in list(_sessions.items()):
            if value is session:
                del _sessions[key]
    session.close()
