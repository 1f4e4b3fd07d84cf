"""The TLS 1.2 ClientHello we build and the checks a TLS 1.2 ServerHello
must pass (RFC 5246 section 7.4.1, with RFC 5746, RFC 7627 and RFC 5077).

`build_client_hello12` builds the ClientHello of a connection that offers
only TLS 1.2, and of every renegotiation. A ClientHello that also offers
TLS 1.3 comes from `hello.py` plus `offer.py`, and its TLS 1.2 ServerHello
is checked here the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...signer import SignatureScheme
from .. import messages as m
from ..alerts import (
    HandshakeFailure,
    IllegalParameter,
    ProtocolVersion,
    UnsupportedExtension,
)
from ..config import TLSClientConfig, is_ip_literal
from .key_schedule12 import CIPHER_SUITES12, SUITES12, Suite12
from .messages12 import (
    ExtensionType12,
    pull_ec_point_formats,
    pull_renegotiation_info,
    push_ec_point_formats,
    push_renegotiation_info,
)

E = m.ExtensionType
E12 = ExtensionType12

# Groups a TLS 1.2 ServerKeyExchange may use (RFC 8422 section 5.1.1):
# x25519 first, then the NIST curves. The hybrid group is TLS 1.3 only.
# secp521r1 is listed for the same reason as in hello.SUPPORTED_GROUPS.
GROUPS12 = (
    m.NamedGroup.x25519,
    m.NamedGroup.secp256r1,
    m.NamedGroup.secp384r1,
    m.NamedGroup.secp521r1,
)

# signature_algorithms we offer when only TLS 1.2 is offered. Unlike TLS 1.3,
# TLS 1.2 lets the server sign ServerKeyExchange with RSASSA-PKCS1-v1_5.
SIGNATURE_ALGORITHMS12 = (
    SignatureScheme.ecdsa_secp256r1_sha256,
    SignatureScheme.ecdsa_secp384r1_sha384,
    SignatureScheme.ecdsa_secp521r1_sha512,
    SignatureScheme.ed25519,
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
    SignatureScheme.rsa_pkcs1_sha256,
    SignatureScheme.rsa_pkcs1_sha384,
    SignatureScheme.rsa_pkcs1_sha512,
)

# Extensions a TLS 1.2 ServerHello may contain. Anything else we offered
# (key_share, supported_versions, ...) belongs to TLS 1.3 or to the client
# alone, so it is illegal_parameter here.
SERVER_HELLO12_EXTENSIONS = frozenset(
    {
        E.server_name,
        E.max_fragment_length,
        E.status_request,
        E.application_layer_protocol_negotiation,
        E.signed_certificate_timestamp,
        E12.ec_point_formats,
        E12.extended_master_secret,
        E12.session_ticket,
        E12.renegotiation_info,
    }
)


def build_client_hello12(
    config: TLSClientConfig,
    random_bytes: Callable[[int], bytes],
    *,
    renegotiated_connection: bytes = b"",
    ticket: bytes | None = None,
    offer_alpn: bool = True,
) -> m.ClientHello:
    """Build a ClientHello that offers TLS 1.2 alone.

    `renegotiated_connection` is our previous Finished.verify_data on a
    renegotiation, else empty (RFC 5746 section 3.4). `ticket` is a stored
    RFC 5077 ticket to offer; b"" requests a new one, None offers none.
    """
    extensions: list[m.Extension] = []
    if not is_ip_literal(config.server_name):
        extensions.append(
            (E.server_name, m.push_server_name(config.server_name.rstrip(".")))
        )
    extensions += [
        (E.supported_groups, m.push_uint16_list_extension(list(GROUPS12))),
        (E12.ec_point_formats, push_ec_point_formats()),
        (
            E.signature_algorithms,
            m.push_uint16_list_extension(list(SIGNATURE_ALGORITHMS12)),
        ),
        (E12.extended_master_secret, b""),
        (E12.renegotiation_info, push_renegotiation_info(renegotiated_connection)),
    ]
    if config.alpn_protocols and offer_alpn:
        names = [p.encode() for p in config.alpn_protocols]
        extensions.append(
            (E.application_layer_protocol_negotiation, m.push_alpn(names))
        )
    if ticket is not None:
        extensions.append((E12.session_ticket, ticket))
    return m.ClientHello(
        random=random_bytes(m.RANDOM_LENGTH),
        # A session ID lets us tell a resumption from a full handshake: the
        # server echoes it only when it accepts the ticket (RFC 5077 3.4).
        legacy_session_id=random_bytes(32) if ticket else b"",
        cipher_suites=list(CIPHER_SUITES12),
        extensions=extensions,
    )


@dataclass(frozen=True)
class Negotiated12:
    """The choices of a checked TLS 1.2 ServerHello."""

    suite: Suite12
    alpn_protocol: str | None
    secure_renegotiation: bool
    ticket_expected: bool
    session_id_echoed: bool


def offered_uint16_list(client_hello: m.ClientHello, extension_type: int) -> list[int]:
    data = m.find_extension(client_hello.extensions, extension_type)
    if data is None:
        return []
    return m.pull_uint16_list_extension(data, E(extension_type).name, 2)


def check_server_hello12(
    hello: m.ServerHello,
    client_hello: m.ClientHello,
    *,
    offered_tls13: bool,
    renegotiation_info: bytes,
) -> Negotiated12:
    """Check a ServerHello that selects TLS 1.2 and return what it selected.

    `renegotiation_info` is the value the server must echo: empty on the
    first handshake, our verify_data then the server's on a renegotiation.
    """
    # Step 1: version, downgrade sentinel, suite and compression.
    if hello.legacy_version != m.TLS_1_2:
        raise ProtocolVersion(
            f"server selected version 0x{hello.legacy_version:04x}; this client "
            "supports TLS 1.2 and 1.3 only"
        )
    if offered_tls13 and hello.random[-8:] == m.DOWNGRADE_SENTINELS[0]:
        # RFC 8446 section 4.1.3: a TLS 1.3 server selecting 1.2 for a client
        # that offered 1.3 means someone removed 1.3 from our offer.
        raise IllegalParameter(
            "ServerHello.random carries the TLS 1.2 downgrade sentinel"
        )
    suite = SUITES12.get(hello.cipher_suite)
    if suite is None or hello.cipher_suite not in client_hello.cipher_suites:
        raise IllegalParameter(
            f"server selected cipher suite 0x{hello.cipher_suite:04x}, which we did "
            "not offer for TLS 1.2"
        )
    if hello.legacy_compression_method != 0:
        raise IllegalParameter("ServerHello compression_method is not null (0)")

    # Step 2: only extensions we offered, and only those a 1.2 ServerHello
    # may carry (RFC 5246 section 7.4.1.4).
    extensions = hello.extensions or []
    offered = {extension_type for extension_type, _ in client_hello.extensions}
    for extension_type, _ in extensions:
        if extension_type not in offered:
            raise UnsupportedExtension(
                f"ServerHello contains extension {extension_type}, which we did "
                "not offer"
            )
        if extension_type not in SERVER_HELLO12_EXTENSIONS:
            raise IllegalParameter(
                f"extension {extension_type} is not allowed in a TLS 1.2 ServerHello"
            )

    # Step 3: extended master secret is required (RFC 7627 section 5.2
    # lets a client abort; without it the triple handshake attack applies).
    if m.find_extension(extensions, E12.extended_master_secret) != b"":
        raise HandshakeFailure(
            "server does not support the extended master secret (RFC 7627); "
            "enable it on the server or use TLS 1.3"
        )

    # Step 4: secure renegotiation (RFC 5746 sections 3.4 and 3.5).
    data = m.find_extension(extensions, E12.renegotiation_info)
    if data is None and renegotiation_info:
        raise HandshakeFailure("renegotiation ServerHello lacks renegotiation_info")
    if data is not None and pull_renegotiation_info(data) != renegotiation_info:
        raise HandshakeFailure("ServerHello renegotiation_info does not match")

    # Step 5: the other extensions.
    points = m.find_extension(extensions, E12.ec_point_formats)
    if points is not None:
        pull_ec_point_formats(points)
    name = m.find_extension(extensions, E.server_name)
    if name:
        raise IllegalParameter("server_name in ServerHello is not empty")
    ticket = m.find_extension(extensions, E12.session_ticket)
    if ticket:
        raise IllegalParameter("session_ticket in ServerHello is not empty")
    return Negotiated12(
        suite=suite,
        alpn_protocol=_selected_alpn(extensions, client_hello),
        secure_renegotiation=data is not None,
        ticket_expected=ticket is not None,
        session_id_echoed=bool(hello.legacy_session_id_echo)
        and hello.legacy_session_id_echo == client_hello.legacy_session_id,
    )


def _selected_alpn(
    extensions: list[m.Extension], client_hello: m.ClientHello
) -> str | None:
    data = m.find_extension(extensions, E.application_layer_protocol_negotiation)
    if data is None:
        return None
    offered_data = m.find_extension(
        client_hello.extensions, E.application_layer_protocol_negotiation
    )
    offered = m.pull_alpn(offered_data) if offered_data else []
    names = m.pull_alpn(data)
    # RFC 7301 section 3.1: exactly one protocol, one we offered.
    if len(names) != 1 or names[0] not in offered:
        raise IllegalParameter(
            f"server selected ALPN {names!r}, not one of {offered!r}"
        )
    try:
        return names[0].decode()
    except UnicodeDecodeError:
        raise IllegalParameter("ALPN protocol is not UTF-8") from None
