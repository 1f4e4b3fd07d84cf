"""Resumption tickets kept between connections (RFC 8446 sections 2.2, 4.6.1).

A `SessionCache` maps a caller-chosen key, such as (host, port, SNI, client
identity fingerprints), to the newest tickets a server sent on that key. A
resumed handshake costs no client signature, which matters when the key sits
in a slow token. The cache owns expiry and single use; the client state
machine only stores and takes tickets.

The cache also stores, per key, the key exchange group the server selected
last time (a group hint), so the next ClientHello to that upstream carries
one key share instead of two.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from cryptography import x509

from .config import ClientIdentity
from .key_schedule import CipherSuite
from .messages import NamedGroup
from .tls12.session12 import Session12

# Upper bound on ticket_lifetime, in seconds: RFC 8446 section 4.6.1 forbids
# servers to send more than 7 days and clients to use a ticket longer.
MAX_TICKET_LIFETIME_SECONDS = 7 * 24 * 3600

# Cache keys (upstreams) kept at once; the least recently used key goes
# first. One entry per upstream a proxy talks to, so 1024 covers a busy
# workstation with room to spare (an estimate, not a measurement).
MAX_SESSION_CACHE_KEYS = 1024

# Seconds from the first storage of a group hint until the next ClientHello
# offers the initial shares again. Handshakes that select the same group do
# not extend it. It bounds how long an upstream that adds the post-quantum
# hybrid keeps getting only a classical share from us, because a server
# that takes any acceptable share would not ask for the hybrid. One hour
# costs one extra hybrid share per upstream and hour (an estimate of a fair
# trade, not a measurement).
GROUP_HINT_LIFETIME_SECONDS = 3600.0

# Tickets kept per key, newest first. OpenSSL 3.0 sends two tickets after a
# full handshake and one after a resumption, and each ticket is used once,
# so four leave spares for parallel connections to one upstream.
MAX_TICKETS_PER_KEY = 4


@dataclass(frozen=True)
class SessionTicket:
    """One NewSessionTicket and what resuming with it needs.

    `received_at` is on the cache's clock, in seconds. `peer_chain` and
    `client_identity` come from the full handshake that created the session,
    because a resumed handshake carries no certificates.
    """

    ticket: bytes
    psk: bytes
    cipher_suite: CipherSuite
    ticket_age_add: int
    lifetime: float
    received_at: float
    peer_chain: tuple[x509.Certificate, ...] = ()
    client_identity: ClientIdentity | None = None

    def expired(self, now: float) -> bool:
        return now - self.received_at >= self.lifetime

    def obfuscated_age(self, now: float) -> int:
        """obfuscated_ticket_age: the age in ms plus ticket_age_add mod 2^32."""
        age_ms = max(0, int((now - self.received_at) * 1000))
        return (age_ms + self.ticket_age_add) % 2**32


class SessionCache:
    """Resumption tickets per key, bounded in keys and tickets per key.

    Safe to share between tasks and threads. `clock` returns seconds and
    exists so tests can move time; production code keeps the default.
    """

    def __init__(
        self,
        *,
        max_keys: int = MAX_SESSION_CACHE_KEYS,
        max_tickets_per_key: int = MAX_TICKETS_PER_KEY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_keys < 1 or max_tickets_per_key < 1:
            raise ValueError(
                f"session cache bounds must be at least 1, got max_keys={max_keys} "
                f"max_tickets_per_key={max_tickets_per_key}"
            )
        self.max_keys = max_keys
        self.max_tickets_per_key = max_tickets_per_key
        self.clock = clock
        self._lock = threading.Lock()
        self._tickets: OrderedDict[Hashable, list[SessionTicket]] = OrderedDict()
        # TLS 1.2 sessions, one per key, because an RFC 5077 ticket may be reused.
        self._sessions12: OrderedDict[Hashable, Session12] = OrderedDict()
        # Group hints, one per key and at most `max_keys`, least recently
        # used first.
        self._groups: OrderedDict[Hashable, tuple[NamedGroup, float]] = OrderedDict()

    def __len__(self) -> int:
        """Number of tickets stored, expired ones included until next use."""
        with self._lock:
            count = sum(len(tickets) for tickets in self._tickets.values())
            return count + len(self._sessions12)

    def put(self, key: Hashable, ticket: SessionTicket) -> None:
        """Store `ticket` as the newest for `key`, dropping the oldest beyond
        the per-key bound and the least recently used key beyond the key
        bound."""
        with self._lock:
            tickets = self._tickets.pop(key, [])
            tickets.insert(0, ticket)
            del tickets[self.max_tickets_per_key :]
            self._tickets[key] = tickets
            while len(self._tickets) > self.max_keys:
                self._tickets.popitem(last=False)

    def take(self, key: Hashable) -> SessionTicket | None:
        """Remove and return the newest unexpired ticket for `key`.

        A TLS 1.3 ticket is used once (RFC 8446 appendix C.4), so the ticket
        leaves the cache whether or not the server accepts it. Expired
        tickets for `key` are dropped on the way.
        """
        now = self.clock()
        with self._lock:
            tickets = self._tickets.get(key)
            if tickets is None:
                return None
            live = [ticket for ticket in tickets if not ticket.expired(now)]
            ticket = live.pop(0) if live else None
            if live:
                self._tickets[key] = live
                self._tickets.move_to_end(key)
            else:
                del self._tickets[key]
            return ticket

    def put_tls12(self, key: Hashable, session: Session12) -> None:
        """Store `session` as the TLS 1.2 session for `key`, replacing the
        previous one and dropping the least recently used key beyond the
        key bound."""
        with self._lock:
            self._sessions12.pop(key, None)
            self._sessions12[key] = session
            while len(self._sessions12) > self.max_keys:
                self._sessions12.popitem(last=False)

    def take_tls12(self, key: Hashable) -> Session12 | None:
        """Remove and return the unexpired TLS 1.2 session for `key`. The
        client stores it again after a resumption that brings no new
        ticket."""
        now = self.clock()
        with self._lock:
            session = self._sessions12.pop(key, None)
            if session is None or session.expired(now):
                return None
            return session

    def put_key_share_group(self, key: Hashable, group: NamedGroup) -> None:
        """Store `group` as the group hint for `key`, dropping the least
        recently used hint beyond the key bound.

        Storing the group that a live hint already names keeps the hint's
        first storage time, so a hint in use still expires
        `GROUP_HINT_LIFETIME_SECONDS` after it was first stored. Another
        group, or an expired hint, starts a new lifetime.

        Call it only after the server's Finished has been verified, so the
        group is one an authenticated server selected, not one an on-path
        attacker forged in a ServerHello.
        """
        now = self.clock()
        with self._lock:
            stored_at = now
            entry = self._groups.pop(key, None)
            if entry is not None:
                old_group, old_stored_at = entry
                live = now - old_stored_at < GROUP_HINT_LIFETIME_SECONDS
                if old_group == group and live:
                    stored_at = old_stored_at
            self._groups[key] = (group, stored_at)
            while len(self._groups) > self.max_keys:
                self._groups.popitem(last=False)

    def key_share_group(self, key: Hashable) -> NamedGroup | None:
        """Return the group hint for `key`, or None when there is none or it
        is older than `GROUP_HINT_LIFETIME_SECONDS`. A live hint stays
        stored, and an expired one is dropped."""
        now = self.clock()
        with self._lock:
            entry = self._groups.get(key)
            if entry is None:
                return None
            group, stored_at = entry
            if now - stored_at >= GROUP_HINT_LIFETIME_SECONDS:
                del self._groups[key]
                return None
            self._groups.move_to_end(key)
            return group

    def clear(self) -> None:
        """Drop every ticket and group hint, for example after client
        identities reload."""
        with self._lock:
            self._tickets.clear()
            self._sessions12.clear()
            self._groups.clear()
