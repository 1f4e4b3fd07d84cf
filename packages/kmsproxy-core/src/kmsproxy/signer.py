"""The `Signer` interface: a private key that never leaves its store.

Everything that needs a signature (the TLS client's CertificateVerify, the
local CA minting leaf certificates, `kmsproxy csr`) goes through a `Signer`.
This module owns the mapping between TLS SignatureSchemes (RFC 8446 section
4.2.3) and `cryptography` primitives, and the one software implementation
that the file backend and the tests use.
"""

from __future__ import annotations

import abc
import enum
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TypeAlias, TypeVar

import anyio
import anyio.from_thread
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

PublicKey: TypeAlias = (
    ec.EllipticCurvePublicKey
    | rsa.RSAPublicKey
    | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
)
PrivateKey: TypeAlias = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

_T = TypeVar("_T")


class SignatureScheme(enum.IntEnum):
    """TLS SignatureScheme code points (RFC 8446 section 4.2.3)."""

    rsa_pkcs1_sha256 = 0x0401
    rsa_pkcs1_sha384 = 0x0501
    rsa_pkcs1_sha512 = 0x0601
    ecdsa_secp256r1_sha256 = 0x0403
    ecdsa_secp384r1_sha384 = 0x0503
    ecdsa_secp521r1_sha512 = 0x0603
    rsa_pss_rsae_sha256 = 0x0804
    rsa_pss_rsae_sha384 = 0x0805
    rsa_pss_rsae_sha512 = 0x0806
    ed25519 = 0x0807
    ed448 = 0x0808
    rsa_pss_pss_sha256 = 0x0809
    rsa_pss_pss_sha384 = 0x080A
    rsa_pss_pss_sha512 = 0x080B
    # Legacy code points a TLS 1.2 peer may list; never produced by a Signer.
    rsa_pkcs1_sha1 = 0x0201
    ecdsa_sha1 = 0x0203

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm | None:
        """The digest the scheme signs with, or None for EdDSA."""
        return _HASHES.get(self)

    @property
    def is_rsa_pss(self) -> bool:
        return 0x0804 <= self <= 0x0806 or 0x0809 <= self <= 0x080B

    @property
    def is_rsa_pkcs1(self) -> bool:
        return self in (0x0201, 0x0401, 0x0501, 0x0601)

    @property
    def is_ecdsa(self) -> bool:
        return self in (0x0203, 0x0403, 0x0503, 0x0603)


_HASHES: dict[SignatureScheme, hashes.HashAlgorithm] = {
    SignatureScheme.rsa_pkcs1_sha1: hashes.SHA1(),  # noqa: S303 - legacy, never produced
    SignatureScheme.ecdsa_sha1: hashes.SHA1(),  # noqa: S303 - legacy, never produced
    SignatureScheme.rsa_pkcs1_sha256: hashes.SHA256(),
    SignatureScheme.rsa_pkcs1_sha384: hashes.SHA384(),
    SignatureScheme.rsa_pkcs1_sha512: hashes.SHA512(),
    SignatureScheme.ecdsa_secp256r1_sha256: hashes.SHA256(),
    SignatureScheme.ecdsa_secp384r1_sha384: hashes.SHA384(),
    SignatureScheme.ecdsa_secp521r1_sha512: hashes.SHA512(),
    SignatureScheme.rsa_pss_rsae_sha256: hashes.SHA256(),
    SignatureScheme.rsa_pss_rsae_sha384: hashes.SHA384(),
    SignatureScheme.rsa_pss_rsae_sha512: hashes.SHA512(),
    SignatureScheme.rsa_pss_pss_sha256: hashes.SHA256(),
    SignatureScheme.rsa_pss_pss_sha384: hashes.SHA384(),
    SignatureScheme.rsa_pss_pss_sha512: hashes.SHA512(),
}

_ECDSA_CURVE_SCHEMES: dict[str, SignatureScheme] = {
    "secp256r1": SignatureScheme.ecdsa_secp256r1_sha256,
    "secp384r1": SignatureScheme.ecdsa_secp384r1_sha384,
    "secp521r1": SignatureScheme.ecdsa_secp521r1_sha512,
}


def schemes_for_public_key(public_key: PublicKey) -> list[SignatureScheme]:
    """List every scheme a key of this type can produce, in preference order.

    Backends whose device supports fewer mechanisms report a subset. ECDSA keys
    get only the scheme bound to their curve, because TLS 1.3 pairs each curve
    with one hash.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        scheme = _ECDSA_CURVE_SCHEMES.get(public_key.curve.name)
        return [scheme] if scheme is not None else []
    if isinstance(public_key, rsa.RSAPublicKey):
        return [
            SignatureScheme.rsa_pss_rsae_sha256,
            SignatureScheme.rsa_pss_rsae_sha384,
            SignatureScheme.rsa_pss_rsae_sha512,
            SignatureScheme.rsa_pkcs1_sha256,
            SignatureScheme.rsa_pkcs1_sha384,
            SignatureScheme.rsa_pkcs1_sha512,
        ]
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return [SignatureScheme.ed25519]
    if isinstance(public_key, ed448.Ed448PublicKey):
        return [SignatureScheme.ed448]
    return []


def verify_signature(
    public_key: PublicKey, signature: bytes, data: bytes, scheme: SignatureScheme
) -> None:
    """Check a TLS wire-form signature; raise `InvalidSignature` on mismatch.

    Raise `ValueError` when the scheme does not fit the key type.
    """
    digest = scheme.hash_algorithm
    if isinstance(public_key, rsa.RSAPublicKey) and digest is not None:
        if scheme.is_rsa_pss:
            # TLS fixes the PSS salt length to the digest length (RFC 8446 4.2.3).
            pss = padding.PSS(padding.MGF1(digest), digest.digest_size)
            public_key.verify(signature, data, pss, digest)
            return
        if scheme.is_rsa_pkcs1:
            public_key.verify(signature, data, padding.PKCS1v15(), digest)
            return
    if (
        isinstance(public_key, ec.EllipticCurvePublicKey)
        and scheme.is_ecdsa
        and digest is not None
    ):
        public_key.verify(signature, data, ec.ECDSA(digest))
        return
    if isinstance(public_key, ed25519.Ed25519PublicKey) and scheme == 0x0807:
        public_key.verify(signature, data)
        return
    if isinstance(public_key, ed448.Ed448PublicKey) and scheme == 0x0808:
        public_key.verify(signature, data)
        return
    raise ValueError(f"signature scheme {scheme.name} does not fit this key type")


def sign_with_private_key(
    private_key: PrivateKey, data: bytes, scheme: SignatureScheme
) -> bytes:
    """Sign `data` with a software key and return the TLS wire form."""
    digest = scheme.hash_algorithm
    if isinstance(private_key, rsa.RSAPrivateKey) and digest is not None:
        if scheme.is_rsa_pss:
            pss = padding.PSS(padding.MGF1(digest), digest.digest_size)
            return private_key.sign(data, pss, digest)
        if scheme.is_rsa_pkcs1:
            return private_key.sign(data, padding.PKCS1v15(), digest)
    if (
        isinstance(private_key, ec.EllipticCurvePrivateKey)
        and scheme.is_ecdsa
        and digest is not None
    ):
        return private_key.sign(data, ec.ECDSA(digest))
    if isinstance(private_key, ed25519.Ed25519PrivateKey) and scheme == 0x0807:
        return private_key.sign(data)
    if isinstance(private_key, ed448.Ed448PrivateKey) and scheme == 0x0808:
        return private_key.sign(data)
    raise ValueError(f"signature scheme {scheme.name} does not fit this key type")


class SignerError(Exception):
    """A signing operation failed in the key store (device gone, PIN, ...).

    The message names the key URI (secrets redacted) and what to do.
    """


class Signer(abc.ABC):
    """A private key held by a store that signs but never reveals it.

    Implementations must be safe to call from many tasks at once: a backend
    whose device does one operation at a time serialises calls itself (see
    `BlockingSigner`).
    """

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The key's URI or path, with secrets (PINs, tokens) redacted."""

    @abc.abstractmethod
    def public_key(self) -> PublicKey:
        """The key's public half."""

    @property
    @abc.abstractmethod
    def schemes(self) -> Sequence[SignatureScheme]:
        """The TLS schemes this key can produce, most preferred first.

        Report only what will work: an RSA token without PSS must not list
        `rsa_pss_rsae_*`, so the TLS client can choose TLS 1.2 instead of
        failing mid-handshake.
        """

    @abc.abstractmethod
    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        """Sign `data` (the whole message, not a digest) with `scheme`.

        Return the signature in TLS wire form: DER `ECDSA-Sig-Value` for
        ECDSA, the raw signature for RSA and EdDSA. Raise `SignerError` when
        the store fails, `ValueError` for a scheme not in `schemes`.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook, no-op default
        """Release the store's resources (sessions, handles)."""


class SoftwareSigner(Signer):
    """A `Signer` over an in-memory `cryptography` private key.

    Used by the file backend and for the local CA's own key when it lives in
    a file. Software signatures take well under a millisecond, so they run in
    the event loop's thread.
    """

    def __init__(self, private_key: PrivateKey, uri: str) -> None:
        self._private_key = private_key
        self._uri = uri
        self._schemes = schemes_for_public_key(private_key.public_key())

    @property
    def uri(self) -> str:
        return self._uri

    def public_key(self) -> PublicKey:
        return self._private_key.public_key()

    @property
    def schemes(self) -> Sequence[SignatureScheme]:
        return self._schemes

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        if scheme not in self._schemes:
            raise ValueError(f"{self._uri}: cannot sign with {scheme.name}")
        return sign_with_private_key(self._private_key, data, scheme)


# Time one Signer call may take, in the handshake or for a post-handshake
# CertificateRequest, before it fails with `SignatureFailed` (the TLS client
# reads it from here). A token that waits for a touch must finish within it.
# Like the handshake bound, 20 s is an estimate for a slow token, not a
# measurement.
SIGNATURE_TIMEOUT_SECONDS = 20.0

# How long a device call waits for an earlier call on the same device: as
# long as the handshake waits for one signature, because the caller of the
# waiting call has given up by then too, so waiting longer only occupies a
# thread.
ABANDONED_CALL_WAIT_SECONDS = SIGNATURE_TIMEOUT_SECONDS

# How often a call waiting for the device checks whether its caller was
# cancelled, so that an abandoned waiter frees its thread within this time.
_CANCEL_CHECK_SECONDS = 0.1


class _DeviceSlots:
    """The calls on one device, counted by the worker threads that make them.

    The limiter alone cannot bound the calls on the device: anyio releases a
    token as soon as its caller is cancelled, while the abandoned thread still
    runs. So each thread takes a slot here for the whole device call, and the
    number of slots follows `limiter.total_tokens` at each call (unbounded for
    `math.inf`).
    """

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._condition = threading.Condition()
        self._held = 0
        self._abandoned = 0

    def acquire(self, call: _DeviceCall, uri: str) -> None:
        """Take a slot for `call`, or raise if the call should not run.

        Raises the cancellation exception if the caller was cancelled while
        waiting, and `SignerError` when every slot is held by an abandoned
        call (which may never return) or after `ABANDONED_CALL_WAIT_SECONDS`.
        """
        deadline = time.monotonic() + ABANDONED_CALL_WAIT_SECONDS
        with self._condition:
            while True:
                anyio.from_thread.check_cancelled()
                if call.abandoned:
                    raise SignerError(f"{uri}: the caller was cancelled")
                if self._held < self._limiter.total_tokens:
                    self._held += 1
                    call.holding = True
                    return
                if self._abandoned >= self._held:
                    raise SignerError(
                        f"{uri}: the device is still busy with a call that "
                        "timed out; check that the device responds"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SignerError(
                        f"{uri}: timed out after {ABANDONED_CALL_WAIT_SECONDS:g} s "
                        "waiting for other calls on the device; check that the "
                        "device responds"
                    )
                self._condition.wait(min(remaining, _CANCEL_CHECK_SECONDS))

    def release(self, call: _DeviceCall) -> None:
        with self._condition:
            self._held -= 1
            if call.abandoned:
                self._abandoned -= 1
            call.holding = False
            self._condition.notify_all()

    def abandon(self, call: _DeviceCall) -> None:
        """Record that the caller of `call` was cancelled."""
        with self._condition:
            call.abandoned = True
            if call.holding:
                self._abandoned += 1
            self._condition.notify_all()


class _DeviceCall:
    """The state of one device call, guarded by its `_DeviceSlots`."""

    def __init__(self) -> None:
        self.holding = False
        self.abandoned = False


_device_slots: weakref.WeakKeyDictionary[anyio.CapacityLimiter, _DeviceSlots] = (
    weakref.WeakKeyDictionary()
)
_device_slots_guard = threading.Lock()


def _slots_for(limiter: anyio.CapacityLimiter) -> _DeviceSlots:
    with _device_slots_guard:
        slots = _device_slots.get(limiter)
        if slots is None:
            slots = _DeviceSlots(limiter)
            _device_slots[limiter] = slots
        return slots


class BlockingSigner(Signer):
    """Base for backends whose library blocks (PKCS#11, TPM, cloud SDKs).

    Subclasses implement `sign_blocking`; `sign` runs it in a worker thread
    behind `limiter`, which backends share per device so one token sees one
    operation at a time while other tunnels keep flowing.

    A caller that is cancelled (a handshake or mint timeout, the proxy
    stopping) returns at once and abandons the worker thread, which keeps
    running until the device returns. That thread still holds its slot of
    the device (one of `limiter.total_tokens`). When every slot is held by
    an abandoned call, the next call raises `SignerError` at once. When a
    live call holds the slot, the next call waits in its own thread for up
    to `ABANDONED_CALL_WAIT_SECONDS`, and does not run if its caller was
    cancelled meanwhile. A hung device therefore gives 502 answers instead
    of hung tunnels.

    Every call made through `sign` or `run_blocking` counts against the
    limiter, and the device never sees more of those calls at once than the
    limiter has tokens. The open hooks (also run when a reload reopens a key
    file) run outside the limiter, so a backend whose device cannot overlap
    them with a signature must guard the device with its own lock.
    """

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self.limiter = limiter

    @abc.abstractmethod
    def sign_blocking(self, data: bytes, scheme: SignatureScheme) -> bytes:
        """Sign in the calling (worker) thread; same contract as `sign`."""

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        if scheme not in self.schemes:
            raise ValueError(f"{self.uri}: cannot sign with {scheme.name}")
        return await self.run_blocking(self.sign_blocking, data, scheme)

    async def run_blocking(self, function: Callable[..., _T], *args: object) -> _T:
        """Run a blocking device call in a worker thread behind the limiter.

        Cancelling the caller abandons the thread (see the class docstring).
        """
        slots = _slots_for(self.limiter)
        call = _DeviceCall()

        def call_holding_device() -> _T:
            slots.acquire(call, self.uri)
            try:
                return function(*args)
            finally:
                slots.release(call)

        try:
            return await anyio.to_thread.run_sync(
                call_holding_device, limiter=self.limiter, abandon_on_cancel=True
            )
        except anyio.get_cancelled_exc_class():
            slots.abandon(call)
            raise
