"""Client identities: keys paired with certificate chains, and their reloads.

An identity is a leaf certificate's chain plus the `Signer` whose public key
matches the leaf. `IdentityStore` owns the current set and replaces it as a
whole, so a tunnel that took a snapshot keeps using it while the store
reloads. Reloads happen when a watched file changes, on SIGHUP, and when the
earliest certificate expires. They run one at a time, and a failed reload
keeps the last good set.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.abc
import anyio.from_thread
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from kmsproxy.certificates import CertificateError, CertificateSource
from kmsproxy.config import CertificateSpec, KeySpec
from kmsproxy.errors import UserError
from kmsproxy.files import read_key_file
from kmsproxy.plugins.registry import FILE_SCHEME, Registry
from kmsproxy.signer import PublicKey, Signer, SignerError
from kmsproxy.uri import redact_text

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Seconds between reload attempts while the earliest certificate stays
# expired: often enough to pick up a renewal soon, rare enough to keep the
# log readable.
EXPIRED_RETRY_SECONDS = 60.0

# Milliseconds watchfiles waits for more changes before reporting a batch.
# An editor or `step ca renew` writes a file in a few steps; 300 ms groups
# them into one reload.
WATCH_DEBOUNCE_MILLISECONDS = 300

# Milliseconds between checks of the stop event while watching, which bounds
# how long cancelling the watcher waits for its thread.
WATCH_STEP_MILLISECONDS = 50

# Milliseconds a watch waits with no event before the watcher re-resolves
# the watched paths, in case a directory was replaced without an event in a
# watched directory.
WATCH_TIMEOUT_MILLISECONDS = 5_000

# Seconds before watching again after a watched directory vanished while
# the watches were being set up.
WATCH_RETRY_SECONDS = 1.0

# Seconds allowed for closing one replaced `Signer`; a hung device must not
# stall the reload that replaced it.
SIGNER_CLOSE_TIMEOUT_SECONDS = 5.0

# Maximum seconds a backend may take to open or reopen one key, here and in
# `kmsproxy csr` and `kmsproxy init --key`. Opening reads a file, logs in to a
# token or calls a KMS API a few times, which takes seconds at most (an
# estimate). A KMS endpoint that fails each call still ends botocore's retries
# (3 attempts with 8 s timeouts each) well within this. A hung device then
# fails startup or the reload instead of blocking it.
KEY_OPEN_TIMEOUT_SECONDS = 60.0

# Fingerprint of one watched file: its resolved path, and the SHA-256 of its
# content or the error that prevented reading it.
FileFingerprint = tuple[str, str, str]


@dataclass(frozen=True)
class Identity:
    """A client certificate chain (leaf first) and the key that signs for it."""

    chain: tuple[x509.Certificate, ...]
    signer: Signer
    certificate_uri: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def subject(self) -> str:
        return self.leaf.subject.rfc4514_string()

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    def is_valid_at(self, when: datetime.datetime) -> bool:
        """Tell whether the leaf's validity period contains `when`.

        RFC 5280 section 4.1.2.5: the period runs from notBefore through
        notAfter, both inclusive, as in the TLS client's own check.
        """
        return self.leaf.not_valid_before_utc <= when <= self.not_after


@dataclass
class KeySlot:
    """One `--clientkey` argument: its signer and how to reopen it.

    `reopen` is set for keys in files, which are re-read on every reload so
    a rotated key file is picked up; hardware keys stay open. `owned` is
    False for a `Signer` that the caller passed in ready, which the store
    then never closes.
    """

    signer: Signer
    path: Path | None = None
    reopen: Callable[[], Signer] | None = None
    owned: bool = True


@dataclass(frozen=True)
class Pairing:
    """The result of matching keys with certificate chains."""

    identities: tuple[Identity, ...]
    unmatched_keys: tuple[Signer, ...]
    unmatched_certificates: tuple[str, ...]


def _public_key_bytes(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pair_identities(
    signers: Sequence[Signer],
    chains: Sequence[tuple[str, Sequence[x509.Certificate]]],
) -> Pairing:
    """Pair each chain with the signer whose public key matches its leaf.

    `chains` contains (source URI, chain) pairs. The pairing follows the order
    of the chains, which is the order the TLS client prefers them in.
    """
    by_key = {_public_key_bytes(s.public_key()): s for s in signers}
    used: set[bytes] = set()
    identities: list[Identity] = []
    unmatched_certificates: list[str] = []
    for uri, chain in chains:
        try:
            leaf_key = _public_key_bytes(chain[0].public_key())  # type: ignore[arg-type]
        except (IndexError, ValueError, UnsupportedAlgorithm) as error:
            logger.warning(
                "Client certificate has no usable public key certificate=%s error=%s",
                uri,
                error or "empty chain",
            )
            unmatched_certificates.append(uri)
            continue
        signer = by_key.get(leaf_key)
        if signer is None:
            unmatched_certificates.append(uri)
            continue
        used.add(leaf_key)
        identities.append(Identity(tuple(chain), signer, uri))
    unmatched_keys = tuple(s for k, s in by_key.items() if k not in used)
    return Pairing(tuple(identities), unmatched_keys, tuple(unmatched_certificates))


def open_key_slot(registry: Registry, key: KeySpec) -> KeySlot:
    """Open a `--clientkey` argument (path, URI or ready `Signer`)."""
    if isinstance(key, Signer):
        return KeySlot(key, owned=False)
    argument = os.fspath(key)
    uri = registry.resolve(argument)
    signer = registry.open_signer(argument)
    if uri.scheme != FILE_SCHEME:
        return KeySlot(signer)
    path = Path(uri.get("path") or argument).expanduser()
    return KeySlot(signer, path, lambda: registry.open_signer(argument))


def open_certificate_source(
    registry: Registry, certificate: CertificateSpec
) -> CertificateSource:
    """Open a `--clientcert` argument (path, URI or ready source)."""
    if isinstance(certificate, CertificateSource):
        return certificate
    return registry.open_certificates(os.fspath(certificate))


class IdentityStore:
    """The current identities, replaced whole on each successful reload."""

    def __init__(
        self, keys: Sequence[KeySlot], sources: Sequence[CertificateSource]
    ) -> None:
        """Keep the keys and sources; call `load` before use."""
        if not keys:
            raise UserError("no client key given (use --clientkey)")
        if not sources:
            raise UserError("no client certificate given (use --clientcert)")
        self.keys = list(keys)
        self.sources = list(sources)
        self._identities: tuple[Identity, ...] = ()
        self._installed_at = datetime.datetime.min.replace(tzinfo=datetime.UTC)
        self._changed = anyio.Event()
        self._reload_callbacks: list[Callable[[], None]] = []
        # Held across reading, pairing and installing, so reloads run one at
        # a time and an older result is never installed over a newer one.
        self._reload_lock = anyio.Lock()
        # The watched files as the last load or reload read them.
        self._fingerprints: tuple[FileFingerprint, ...] = ()
        self.reload_count = 0
        self.failed_reload_count = 0

    @classmethod
    async def open(
        cls,
        registry: Registry,
        keys: Sequence[KeySpec],
        certificates: Sequence[CertificateSpec],
    ) -> IdentityStore:
        """Open every key and certificate argument through `registry`.

        When one argument fails, the keys already opened are closed before
        the error propagates, so a device session is not left open. Backends
        open keys with blocking device or network calls, so each one opens
        in a worker thread and the event loop keeps serving meanwhile (see
        `_open_within` for cancellation and the time limit).
        """
        slots: list[KeySlot] = []
        try:
            for key in keys:
                if isinstance(key, Signer):
                    shown = key.uri
                else:
                    shown = redact_text(os.fspath(key), hide_bare_parts=False)
                slots.append(
                    await _open_within(
                        functools.partial(open_key_slot, registry, key),
                        lambda slot: [slot.signer] if slot.owned else [],
                        shown,
                    )
                )
            sources = [
                await anyio.to_thread.run_sync(open_certificate_source, registry, c)
                for c in certificates
            ]
            return cls(slots, sources)
        except BaseException:
            await close_signers([slot.signer for slot in slots if slot.owned])
            raise

    @property
    def identities(self) -> tuple[Identity, ...]:
        """The current identities, those valid now first.

        Callers keep this tuple as their snapshot. The TLS client presents
        the first identity that the server accepts, so an expired
        certificate (say, after a failed renewal) is used only when no
        valid one is available. The order is otherwise the configured one.
        """
        now = datetime.datetime.now(datetime.UTC)
        return tuple(
            sorted(self._identities, key=lambda identity: not identity.is_valid_at(now))
        )

    def add_reload_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` after each successful reload, such as to drop
        TLS sessions that the previous identities established."""
        self._reload_callbacks.append(callback)

    def watch_paths(self) -> list[Path]:
        paths = [p for source in self.sources for p in source.watch_paths()]
        paths += [slot.path for slot in self.keys if slot.path is not None]
        return list(dict.fromkeys(Path(os.path.abspath(p)) for p in paths))

    async def load(self) -> tuple[Identity, ...]:
        """Load and pair everything; raise `UserError` when nothing pairs."""
        async with self._reload_lock:
            self._fingerprints = await self._fingerprint_files()
            pairing, signers = await self._pair()
            await self._install(pairing, signers)
        return self.identities

    async def reload(self, reason: str) -> bool:
        """Reload keys and chains; on failure keep the current set and log why.

        Any exception from a backend counts as a failure, so a faulty
        plugin cannot stop the proxy. Cancellation still propagates.
        """
        async with self._reload_lock:
            self._fingerprints = await self._fingerprint_files()
            return await self._reload_locked(reason)

    async def reload_if_changed(self, reason: str) -> bool:
        """Reload when a watched file's resolved path or content changed.

        A watched directory also reports changes to unrelated files, such
        as a renewal tool's temporary file, and a Kubernetes volume reports
        only its `..data` symlink, so the content decides. The logged reason
        names the watched files that changed. Return whether a reload ran
        and succeeded.
        """
        async with self._reload_lock:
            fingerprints = await self._fingerprint_files()
            if fingerprints == self._fingerprints:
                return False
            changed = _changed_paths(self._fingerprints, fingerprints)
            self._fingerprints = fingerprints
            return await self._reload_locked(f"{reason} ({','.join(changed)})")

    async def aclose(self) -> None:
        """Close the signers that this store opened, for shutdown."""
        async with self._reload_lock:
            await close_signers([slot.signer for slot in self.keys if slot.owned])

    async def _reload_locked(self, reason: str) -> bool:
        try:
            pairing, signers = await self._pair()
        except Exception as error:
            self.failed_reload_count += 1
            expected = (UserError, CertificateError, SignerError, ValueError, OSError)
            logger.warning(
                "Reload failed, keeping the previous identities reason=%s "
                "error_type=%s error=%s",
                reason,
                type(error).__name__,
                error,
                # A traceback helps only for errors that no backend should raise.
                exc_info=not isinstance(error, expected),
            )
            return False
        await self._install(pairing, signers)
        self.reload_count += 1
        for callback in self._reload_callbacks:
            callback()
        logger.info(
            "Reloaded identities reason=%s count=%d", reason, len(self._identities)
        )
        return True

    async def _fingerprint_files(self) -> tuple[FileFingerprint, ...]:
        paths = self.watch_paths()
        return await anyio.to_thread.run_sync(_fingerprint_files, paths)

    async def _pair(self) -> tuple[Pairing, list[Signer]]:
        """Open the keys and chains and pair them; install nothing.

        Return the pairing and the signer for each slot. Keys reopened for
        this attempt are closed again when it fails.
        """
        signers: list[Signer] = []
        try:
            for slot in self.keys:
                if slot.reopen is None:
                    signers.append(slot.signer)
                else:
                    signers.append(
                        await _open_within(
                            slot.reopen, lambda signer: [signer], slot.signer.uri
                        )
                    )
            chains = [(source.uri, await source.load()) for source in self.sources]
            pairing = pair_identities(signers, chains)
            if not pairing.identities:
                keys = ", ".join(s.uri for s in signers)
                certificates = ", ".join(source.uri for source in self.sources)
                raise UserError(
                    f"no client certificate matches a client key: certificates "
                    f"{certificates} do not belong to keys {keys}; pass the key "
                    "that each certificate was issued for"
                )
        except BaseException:
            current = {id(slot.signer) for slot in self.keys}
            await close_signers([s for s in signers if id(s) not in current])
            raise
        return pairing, signers

    async def _install(self, pairing: Pairing, signers: Sequence[Signer]) -> None:
        replaced = [
            slot.signer
            for slot, signer in zip(self.keys, signers, strict=True)
            if signer is not slot.signer and slot.owned
        ]
        for slot, signer in zip(self.keys, signers, strict=True):
            slot.signer = signer
        self._log_pairing(pairing)
        self._identities = pairing.identities
        self._installed_at = datetime.datetime.now(datetime.UTC)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        # NOTE: a tunnel that took its snapshot before this reload may still
        # sign with a replaced signer. Only file keys are replaced, and the
        # file backend's aclose does nothing, so that is safe today.
        await close_signers(replaced)

    def _log_pairing(self, pairing: Pairing) -> None:
        for signer in pairing.unmatched_keys:
            logger.warning("No certificate matches client key key=%s", signer.uri)
        for uri in pairing.unmatched_certificates:
            logger.warning("No client key matches certificate certificate=%s", uri)
        now = datetime.datetime.now(datetime.UTC)
        for identity in pairing.identities:
            level = logging.WARNING if identity.not_after < now else logging.INFO
            logger.log(
                level,
                "Client identity subject=%s not_after=%s key=%s certificate=%s%s",
                identity.subject,
                identity.not_after.isoformat(),
                identity.signer.uri,
                identity.certificate_uri,
                " expired=yes" if identity.not_after < now else "",
            )

    async def watch(
        self,
        *,
        handle_sighup: bool = True,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Reload on file changes, SIGHUP and expiry until cancelled."""
        async with anyio.create_task_group() as group:
            if self.watch_paths():
                await group.start(self._watch_files)
            if handle_sighup and hasattr(signal, "SIGHUP"):
                await group.start(self._watch_sighup)
            group.start_soon(self._watch_expiry)
            task_status.started()

    def watch_directories(self) -> list[str]:
        """Return the directories to watch for the current watched paths.

        For each file, three directories: its own, whose events report a
        rename-replace (a new inode, which a watch on the old one would
        miss) and a Kubernetes `..data` symlink swap; the one that contains
        its resolved target, for edits behind a symlink; and the parent of
        its own, whose events report that directory being replaced.
        Only directories that exist are listed.
        """
        directories: set[str] = set()
        for path in self.watch_paths():
            own = os.path.dirname(path)
            target = os.path.dirname(os.path.realpath(path))
            directories.update((own, target, os.path.dirname(own)))
        return sorted(d for d in directories if os.path.isdir(d))

    async def _watch_files(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        # watchfiles is imported here so that `import kmsproxy` stays cheap.
        # RustNotify is its documented low-level interface. It is used here
        # rather than `awatch` because its constructor returns only once the
        # watches exist, so `started` is reported after that.
        from watchfiles._rust_notify import RustNotify

        stop = anyio.Event()
        started = False
        async with anyio.create_task_group() as group:
            # The watch thread returns only when `stop` is set, so set it as
            # soon as this task is cancelled.
            group.start_soon(_set_when_cancelled, stop)
            while True:
                directories = _directory_identities(self.watch_directories())
                paths = [path for path, _ in directories]
                try:
                    # Arguments: paths, debug, force_polling, poll_delay_ms,
                    # recursive, ignore_permission_denied.
                    notify = RustNotify(paths, False, False, 0, False, True)
                except (OSError, RuntimeError) as error:
                    if not started:
                        raise
                    # A directory vanished between listing and watching.
                    logger.warning(
                        "Watching files failed, retrying error=%s retry_seconds=%s",
                        error,
                        WATCH_RETRY_SECONDS,
                    )
                    await anyio.sleep(WATCH_RETRY_SECONDS)
                    continue
                with notify:
                    logger.debug("Watching directories paths=%s", ",".join(paths))
                    if started:
                        # A watched directory was replaced or a symlink now
                        # points elsewhere. The new watches exist now, so a
                        # change made from here on raises an event, and this
                        # check catches any change made before.
                        await self.reload_if_changed("watched directories changed")
                    else:
                        task_status.started()
                        started = True
                    while directories == _directory_identities(
                        self.watch_directories()
                    ):
                        changes = await anyio.to_thread.run_sync(
                            notify.watch,
                            WATCH_DEBOUNCE_MILLISECONDS,
                            WATCH_STEP_MILLISECONDS,
                            WATCH_TIMEOUT_MILLISECONDS,
                            stop,
                        )
                        if changes == "stop" or changes == "signal":
                            group.cancel_scope.cancel()
                            return
                        if changes == "timeout":
                            # An event can be lost (a watch added just after
                            # a write, an overflowed queue), so compare the
                            # files' fingerprints on every timeout as well.
                            await self.reload_if_changed("periodic check")
                            continue
                        await self.reload_if_changed("file changed")

    async def _watch_sighup(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with contextlib.ExitStack() as stack:
            try:
                receiver = anyio.open_signal_receiver(signal.SIGHUP)
                signals = stack.enter_context(receiver)
            except (ValueError, NotImplementedError, RuntimeError) as error:
                # Signal handlers can only be installed from the main thread.
                logger.debug("SIGHUP reloads unavailable error=%s", error)
                task_status.started()
                return
            task_status.started()
            async for _ in signals:
                await self.reload("SIGHUP")

    async def _watch_expiry(self) -> None:
        while True:
            changed = self._changed
            now = datetime.datetime.now(datetime.UTC)
            if not self._identities:
                await changed.wait()
                continue
            earliest = min(identity.not_after for identity in self._identities)
            delay = (earliest - now).total_seconds()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await changed.wait()
                continue
            # A set installed after the expiry (at startup, say) already
            # contains the newest files, so reloading at once only repeats it.
            since_install = (now - self._installed_at).total_seconds()
            if self._installed_at >= earliest and since_install < EXPIRED_RETRY_SECONDS:
                with anyio.move_on_after(EXPIRED_RETRY_SECONDS - since_install):
                    await changed.wait()
                continue
            reloaded = await self.reload("certificate expired")
            still_expired = reloaded and min(
                i.not_after for i in self._identities
            ) < datetime.datetime.now(datetime.UTC)
            if not reloaded or still_expired:
                logger.warning(
                    "Client certificate expired, retrying reload not_after=%s "
                    "retry_seconds=%s",
                    earliest.isoformat(),
                    EXPIRED_RETRY_SECONDS,
                )
                await anyio.sleep(EXPIRED_RETRY_SECONDS)


def _directory_identities(directories: Sequence[str]) -> list[tuple[str, int]]:
    """Pair each directory with its inode, so a replaced directory differs."""
    identities: list[tuple[str, int]] = []
    for directory in directories:
        with contextlib.suppress(OSError):
            identities.append((directory, os.stat(directory).st_ino))
    return identities


def _fingerprint_files(paths: Sequence[Path]) -> tuple[FileFingerprint, ...]:
    """Fingerprint each file by resolved path and content (runs in a thread)."""
    fingerprints: list[FileFingerprint] = []
    for path in paths:
        resolved = os.path.realpath(path)
        try:
            digest = hashlib.sha256(read_key_file(Path(resolved))).hexdigest()
        except OSError as error:
            digest = f"unreadable: {error.strerror}"
        fingerprints.append((str(path), resolved, digest))
    return tuple(fingerprints)


def _changed_paths(
    before: Sequence[FileFingerprint], after: Sequence[FileFingerprint]
) -> list[str]:
    """Return the watched paths whose fingerprint differs, in watch order."""
    old = {fingerprint[0]: fingerprint for fingerprint in before}
    new = {fingerprint[0]: fingerprint for fingerprint in after}
    return [path for path in {**new, **old} if old.get(path) != new.get(path)]


async def _open_within(
    open_key: Callable[[], _T], signers_of: Callable[[_T], list[Signer]], shown: str
) -> _T:
    """Run `open_key` in a worker thread within `KEY_OPEN_TIMEOUT_SECONDS`.

    Cancellation and the time limit abandon the thread, so stopping the proxy
    or a reload does not wait for a hung open hook. The signers that
    `open_key` returns after that (`signers_of` lists them) are closed
    through the event loop. NOTE: once the event loop has ended, they stay
    open, and a warning is logged.
    """
    guard = threading.Lock()
    abandoned = False
    late: list[_T] = []

    def open_and_keep() -> _T:
        result = open_key()
        with guard:
            late.append(result)
            close_now = abandoned
        if close_now:
            _close_from_thread(signers_of(result))
        return result

    async def abandon() -> None:
        nonlocal abandoned
        with guard:
            abandoned = True
            opened = list(late)
        if opened:
            await close_signers(signers_of(opened[0]))

    try:
        with anyio.move_on_after(KEY_OPEN_TIMEOUT_SECONDS):
            return await anyio.to_thread.run_sync(open_and_keep, abandon_on_cancel=True)
    except BaseException:
        await abandon()
        raise
    await abandon()
    raise SignerError(
        f"{shown}: opening the key timed out after {KEY_OPEN_TIMEOUT_SECONDS:g} s; "
        "check that the device or service responds"
    )


def _close_from_thread(signers: list[Signer]) -> None:
    """Close signers opened after their caller gave up, from its worker thread."""
    try:
        anyio.from_thread.run(close_signers, signers)
    except Exception as error:
        logger.warning(
            "Closing a key opened after its caller gave up failed keys=%s "
            "error_type=%s error=%s",
            ",".join(signer.uri for signer in signers),
            type(error).__name__,
            error,
        )


async def close_signers(signers: Sequence[Signer]) -> None:
    """Close each signer, logging a failure instead of raising it."""
    for signer in signers:
        with anyio.move_on_after(SIGNER_CLOSE_TIMEOUT_SECONDS, shield=True) as scope:
            try:
                await signer.aclose()
            except Exception as error:
                logger.warning(
                    "Closing a key failed key=%s error_type=%s error=%s",
                    signer.uri,
                    type(error).__name__,
                    error,
                )
        if scope.cancelled_caught:
            logger.warning(
                "Closing a key timed out key=%s timeout_seconds=%s",
                signer.uri,
                SIGNER_CLOSE_TIMEOUT_SECONDS,
            )


async def _set_when_cancelled(event: anyio.Event) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        event.set()
