"""A TLS 1.2 session kept for resumption with an RFC 5077 ticket.

The server encrypts its session state into the ticket. We keep the ticket
with the master secret and what the full handshake verified, because an
abbreviated handshake carries no certificates and no signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from ..config import ClientIdentity
from ..messages import NamedGroup
from .key_schedule12 import CipherSuite12

# Ticket lifetime when the server gives no hint (ticket_lifetime_hint 0):
# 300 s, the default session timeout OpenSSL documents for
# SSL_CTX_set_timeout(3). It is a guess at what the server keeps.
DEFAULT_TICKET_LIFETIME_SECONDS = 300

# Upper bound on a TLS 1.2 ticket's lifetime: RFC 5077 sets none, so we
# apply the 7 days RFC 8446 section 4.6.1 sets for TLS 1.3 tickets.
MAX_TICKET12_LIFETIME_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Session12:
    """A resumable TLS 1.2 session. `received_at` is on the session cache's
    clock, in seconds, and `lifetime` is in seconds. `key_exchange_group`
    is the ServerKeyExchange group of the full handshake that created the
    session, which a resumption stores as the group hint again."""

    ticket: bytes
    master_secret: bytes
    cipher_suite: CipherSuite12
    lifetime: float
    received_at: float
    peer_chain: tuple[x509.Certificate, ...] = ()
    client_identity: ClientIdentity | None = None
    key_exchange_group: NamedGroup | None = None

    def expired(self, now: float) -> bool:
        return now - self.received_at >= self.lifetime


def ticket_lifetime(hint: int) -> float:
    """Return the seconds we keep a ticket whose lifetime hint is `hint`."""
    if hint == 0:
        return DEFAULT_TICKET_LIFETIME_SECONDS
    return min(hint, MAX_TICKET12_LIFETIME_SECONDS)
