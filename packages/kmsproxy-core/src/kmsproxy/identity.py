"""Client identities: keys paired with certificate chains, and their reloads.

An identity is a leaf certificate's chain plus the `Signer` whose public key
matches the leaf. `IdentityStore` owns the current set and replaces it as a
whole, so a tunnel that took a snapshot keeps using it while the store
reloads. Reloads happen when a watched file changes, on SIGHUP, and when the
earliest certificate expires. A failed reload keeps the last good set.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsproxy.certificates import CertificateError, CertificateSource
from kmsproxy.config import CertificateSpec, KeySpec
from kmsproxy.errors import UserError
from kmsproxy.plugins.registry import FILE_SCHEME, Registry
from kmsproxy.signer import PublicKey, Signer, SignerError

logger = logging.getLogger(__name__)

# Seconds between reload attempts while the earliest certificate stays
# expired: often enough to pick up a renewal soon, rare enough to keep the
# log readable.
EXPIRED_RETRY_SECONDS = 60.0

# Milliseconds watchfiles waits for more changes before reporting a batch.
# An editor or `step ca renew` writes a file in a few steps; 300 ms groups
# them into one reload.
WATCH_DEBOUNCE_MILLISECONDS = 300


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


@dataclass
class KeySlot:
    """One `--clientkey` argument: its signer and how to reopen it.

    `reopen` is set for keys in files, which are re-read on every reload so
    a rotated key file is picked up; hardware keys stay open.
    """

    signer: Signer
    path: Path | None = None
    reopen: Callable[[], Signer] | None = None


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
        leaf_key = _public_key_bytes(chain[0].public_key())  # type: ignore[arg-type]
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
        return KeySlot(key)
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
        self._changed = anyio.Event()
        self._reload_callbacks: list[Callable[[], None]] = []
        self.reload_count = 0
        self.failed_reload_count = 0

    @classmethod
    def open(
        cls,
        registry: Registry,
        keys: Sequence[KeySpec],
        certificates: Sequence[CertificateSpec],
    ) -> IdentityStore:
        """Open every key and certificate argument through `registry`."""
        slots = [open_key_slot(registry, key) for key in keys]
        sources = [open_certificate_source(registry, c) for c in certificates]
        return cls(slots, sources)

    @property
    def identities(self) -> tuple[Identity, ...]:
        """The current identities; callers keep this tuple as their snapshot."""
        return self._identities

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
        pairing = await self._pair()
        self._install(pairing)
        return self._identities

    async def reload(self, reason: str) -> bool:
        """Reload keys and chains; on failure keep the current set and log why."""
        try:
            pairing = await self._pair()
        except (UserError, CertificateError, SignerError, ValueError) as error:
            self.failed_reload_count += 1
            logger.warning(
                "Reload failed, keeping the previous identities reason=%s error=%s",
                reason,
                error,
            )
            return False
        self._install(pairing)
        self.reload_count += 1
        for callback in self._reload_callbacks:
            callback()
        logger.info(
            "Reloaded identities reason=%s count=%d", reason, len(self._identities)
        )
        return True

    async def _pair(self) -> Pairing:
        signers = []
        for slot in self.keys:
            if slot.reopen is not None:
                slot.signer = slot.reopen()
            signers.append(slot.signer)
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
        return pairing

    def _install(self, pairing: Pairing) -> None:
        for signer in pairing.unmatched_keys:
            logger.warning("No certificate matches client key key=%s", signer.uri)
        for uri in pairing.unmatched_certificates:
            logger.warning("No client key matches certificate certificate=%s", uri)
        now = datetime.datetime.now(datetime.UTC)
        for identity in pairing.identities:
            level = logging.WARNING if identity.not_after <= now else logging.INFO
            logger.log(
                level,
                "Client identity subject=%s not_after=%s key=%s certificate=%s%s",
                identity.subject,
                identity.not_after.isoformat(),
                identity.signer.uri,
                identity.certificate_uri,
                " expired=yes" if identity.not_after <= now else "",
            )
        self._identities = pairing.identities
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

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

    async def _watch_files(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        # watchfiles is imported here so that `import kmsproxy` stays cheap.
        from watchfiles import awatch

        # Watch the parent directories, because an atomic rename-replace
        # creates a new inode, and a watch on the old inode reports nothing.
        watched = {str(p) for p in self.watch_paths()}
        directories = sorted({os.path.dirname(p) for p in watched})

        def is_watched(_change: object, path: str) -> bool:
            return os.path.abspath(path) in watched

        stop = anyio.Event()
        async with anyio.create_task_group() as group:
            # awatch's worker thread returns only when `stop` is set, so set
            # it as soon as this task is cancelled.
            group.start_soon(_set_when_cancelled, stop)
            changes_iterator = awatch(
                *directories,
                watch_filter=is_watched,
                debounce=WATCH_DEBOUNCE_MILLISECONDS,
                stop_event=stop,
                recursive=False,
            )
            logger.debug("Watching files paths=%s", ",".join(sorted(watched)))
            task_status.started()
            async for changes in changes_iterator:
                names = ",".join(sorted({path for _, path in changes}))
                await self.reload(f"file changed ({names})")
            group.cancel_scope.cancel()

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
            reloaded = await self.reload("certificate expired")
            still_expired = reloaded and min(
                i.not_after for i in self._identities
            ) <= datetime.datetime.now(datetime.UTC)
            if not reloaded or still_expired:
                logger.warning(
                    "Client certificate expired, retrying reload not_after=%s "
                    "retry_seconds=%s",
                    earliest.isoformat(),
                    EXPIRED_RETRY_SECONDS,
                )
                await anyio.sleep(EXPIRED_RETRY_SECONDS)


async def _set_when_cancelled(event: anyio.Event) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        event.set()
