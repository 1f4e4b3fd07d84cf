"""The client's side of PSK resumption (RFC 8446 sections 4.2.11 and 4.6.1):
offering a ticket in the ClientHello, checking the server's choice, and
turning a NewSessionTicket into a stored `SessionTicket`."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509

from . import messages as m
from .alerts import IllegalParameter
from .config import ClientIdentity
from .key_schedule import (
    SUITES,
    CipherSuite,
    KeySchedule,
    Transcript,
    resumption_psk,
)
from .session_cache import MAX_TICKET_LIFETIME_SECONDS, SessionTicket


def offer_ticket(
    hello: m.ClientHello, ticket: SessionTicket, transcript: Transcript, now: float
) -> m.ClientHello:
    """Return `hello` with a pre_shared_key extension for `ticket`, last as
    RFC 8446 section 4.2.11 requires, and its binder filled in.

    `transcript` contains the messages before this ClientHello: none for the
    first, ClientHello1's message_hash and the HelloRetryRequest for the
    second (section 4.2.11.2).
    """
    suite = SUITES[ticket.cipher_suite]

    # Step 1: the extension with a zero binder of the right length, so the
    # encoded length fields are final before the binder is computed.
    identity = m.PskIdentity(ticket.ticket, ticket.obfuscated_age(now))
    placeholder = m.OfferedPsks([identity], [bytes(suite.hash_length)])
    extensions = [
        (extension_type, data)
        for extension_type, data in hello.extensions
        if extension_type != m.ExtensionType.pre_shared_key
    ]
    extensions.append(
        (m.ExtensionType.pre_shared_key, m.push_offered_psks(placeholder))
    )
    offered = _with_extensions(hello, extensions)

    # Step 2: the binder covers the ClientHello up to, not including, the
    # binders list.
    encoded = m.push_client_hello(offered)
    truncated = encoded[: -len(m.push_psk_binders(placeholder.binders))]
    binder = KeySchedule(suite, ticket.psk).binder(
        transcript.digest_with(suite, truncated)
    )

    # Step 3: the one binder is the extension's last bytes, so it replaces
    # the zeros in place instead of encoding the extension again.
    placeholder_data = offered.extensions[-1][1]
    offered.extensions[-1] = (
        m.ExtensionType.pre_shared_key,
        placeholder_data[: -len(binder)] + binder,
    )
    return offered


def without_ticket(hello: m.ClientHello) -> m.ClientHello:
    """Return `hello` without its pre_shared_key extension."""
    extensions = [
        (extension_type, data)
        for extension_type, data in hello.extensions
        if extension_type != m.ExtensionType.pre_shared_key
    ]
    return _with_extensions(hello, extensions)


def _with_extensions(
    hello: m.ClientHello, extensions: list[m.Extension]
) -> m.ClientHello:
    return m.ClientHello(
        random=hello.random,
        legacy_session_id=hello.legacy_session_id,
        cipher_suites=hello.cipher_suites,
        extensions=extensions,
        legacy_version=hello.legacy_version,
        legacy_compression_methods=hello.legacy_compression_methods,
    )


def same_hash(first: CipherSuite, second: CipherSuite) -> bool:
    """True when two suites share the hash a PSK is bound to (section 4.2.11)."""
    return SUITES[first].hash_name == SUITES[second].hash_name


def check_selected_identity(
    data: bytes, ticket: SessionTicket | None, suite: CipherSuite
) -> None:
    """Check the ServerHello's pre_shared_key: it must name the one identity
    we offered, under a suite with the ticket's hash (section 4.2.11)."""
    selected = m.pull_uint16_extension(data, "pre_shared_key")
    if ticket is None or selected != 0:
        raise IllegalParameter(
            f"server selected PSK identity {selected}, which we did not offer"
        )
    if not same_hash(ticket.cipher_suite, suite):
        raise IllegalParameter(
            f"server resumed a {ticket.cipher_suite.name} session with "
            f"{suite.name}, whose hash differs"
        )


def ticket_from_message(
    message: m.NewSessionTicket,
    suite: CipherSuite,
    resumption_master_secret: bytes,
    received_at: float,
    peer_chain: Sequence[x509.Certificate],
    client_identity: ClientIdentity | None,
) -> SessionTicket | None:
    """Build a `SessionTicket`, or None when the lifetime is 0, which means
    the ticket must not be used. Lifetimes above 7 days are capped."""
    if message.ticket_lifetime == 0:
        return None
    psk = resumption_psk(SUITES[suite], resumption_master_secret, message.ticket_nonce)
    return SessionTicket(
        ticket=message.ticket,
        psk=psk,
        cipher_suite=suite,
        ticket_age_add=message.ticket_age_add,
        lifetime=min(message.ticket_lifetime, MAX_TICKET_LIFETIME_SECONDS),
        received_at=received_at,
        peer_chain=tuple(peer_chain),
        client_identity=client_identity,
    )
