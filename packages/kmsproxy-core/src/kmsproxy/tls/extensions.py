"""Which extensions each server message may carry, and what they must contain.

RFC 8446 section 4.2 gives two rules this module applies to every block the
server sends: an extension we recognize in a message it does not belong to
is illegal_parameter, and a response to an extension we did not offer is
unsupported_extension. CertificateRequest is the exception: the server
starts those extensions, so unknown ones there are ignored.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from . import messages as m
from .alerts import (
    DecodeError,
    IllegalParameter,
    MissingExtension,
    UnsupportedExtension,
)

E = m.ExtensionType

_RECOGNIZED = frozenset(int(t) for t in E)

# The "TLS 1.3" column of RFC 8446 section 4.2's table, per message.
SERVER_HELLO_EXTENSIONS = frozenset(
    {E.supported_versions, E.key_share, E.pre_shared_key}
)
HELLO_RETRY_REQUEST_EXTENSIONS = frozenset(
    {E.supported_versions, E.key_share, E.cookie}
)
ENCRYPTED_EXTENSIONS = frozenset(
    {
        E.server_name,
        E.max_fragment_length,
        E.supported_groups,
        E.use_srtp,
        E.heartbeat,
        E.application_layer_protocol_negotiation,
        E.client_certificate_type,
        E.server_certificate_type,
        E.early_data,
        E.record_size_limit,
    }
)
CERTIFICATE_REQUEST_EXTENSIONS = frozenset(
    {
        E.status_request,
        E.signature_algorithms,
        E.signed_certificate_timestamp,
        E.certificate_authorities,
        E.oid_filters,
        E.signature_algorithms_cert,
    }
)
CERTIFICATE_ENTRY_EXTENSIONS = frozenset(
    {E.status_request, E.signed_certificate_timestamp}
)


def _name(extension_type: int) -> str:
    try:
        return E(extension_type).name
    except ValueError:
        return f"extension {extension_type}"


def check_response_extensions(
    extensions: Sequence[m.Extension],
    allowed: Collection[int],
    offered: Collection[int],
    message_name: str,
) -> None:
    """Apply both rules of the module docstring to one block."""
    for extension_type, _ in extensions:
        if extension_type in _RECOGNIZED and extension_type not in allowed:
            raise IllegalParameter(
                f"{_name(extension_type)} is not allowed in {message_name}"
            )
        if extension_type not in offered:
            raise UnsupportedExtension(
                f"{message_name} contains {_name(extension_type)}, which we did "
                "not offer"
            )


def check_server_hello_extensions(
    extensions: Sequence[m.Extension], offered: Collection[int]
) -> None:
    check_response_extensions(
        extensions, SERVER_HELLO_EXTENSIONS, offered, "ServerHello"
    )


def check_hello_retry_request_extensions(
    extensions: Sequence[m.Extension], offered: Collection[int]
) -> None:
    # The server may send a cookie without our asking (RFC 8446 4.2.2).
    check_response_extensions(
        extensions,
        HELLO_RETRY_REQUEST_EXTENSIONS,
        {*offered, E.cookie},
        "HelloRetryRequest",
    )


def check_encrypted_extensions(
    extensions: Sequence[m.Extension],
    offered: Collection[int],
    alpn_offered: Sequence[bytes],
) -> str | None:
    """Check EncryptedExtensions; return the ALPN protocol the server chose."""
    # NOTE: we never offer record_size_limit (RFC 8449), so the check below
    # rejects it with unsupported_extension and records we send are always
    # up to 2^14 bytes. Offering it would require applying the server's
    # limit in `send_application_data`.
    check_response_extensions(
        extensions, ENCRYPTED_EXTENSIONS, offered, "EncryptedExtensions"
    )
    alpn_protocol = None
    for extension_type, data in extensions:
        if extension_type == E.server_name and data:
            # RFC 6066 section 3: the server's server_name data is empty.
            raise DecodeError("server_name in EncryptedExtensions is not empty")
        if extension_type == E.supported_groups:
            m.pull_uint16_list_extension(data, "supported_groups", 2)
        if extension_type == E.application_layer_protocol_negotiation:
            names = m.pull_alpn(data)
            # RFC 7301 section 3.1: exactly one protocol, one we offered.
            if len(names) != 1 or names[0] not in alpn_offered:
                raise IllegalParameter(
                    f"server selected ALPN {names!r}, not one of {list(alpn_offered)!r}"
                )
            try:
                alpn_protocol = names[0].decode()
            except UnicodeDecodeError:
                raise IllegalParameter("ALPN protocol is not UTF-8") from None
    return alpn_protocol


@dataclass(frozen=True)
class ParsedCertificateRequest:
    signature_algorithms: list[int]
    authorities: list[bytes]


def parse_certificate_request(
    request: m.CertificateRequest, *, post_handshake: bool = False
) -> ParsedCertificateRequest:
    """Validate a CertificateRequest (RFC 8446 section 4.3.2). Only a
    post-handshake request may carry a certificate_request_context."""
    if request.certificate_request_context and not post_handshake:
        raise IllegalParameter(
            "CertificateRequest in the handshake has a certificate_request_context"
        )
    signature_algorithms: list[int] | None = None
    authorities: list[bytes] = []
    for extension_type, data in request.extensions:
        if (
            extension_type in _RECOGNIZED
            and extension_type not in CERTIFICATE_REQUEST_EXTENSIONS
        ):
            raise IllegalParameter(
                f"{_name(extension_type)} is not allowed in CertificateRequest"
            )
        if extension_type == E.signature_algorithms:
            signature_algorithms = m.pull_uint16_list_extension(
                data, "signature_algorithms", 2
            )
        elif extension_type == E.signature_algorithms_cert:
            m.pull_uint16_list_extension(data, "signature_algorithms_cert", 2)
        elif extension_type == E.certificate_authorities:
            authorities = m.pull_certificate_authorities(data)
    if signature_algorithms is None:
        raise MissingExtension("CertificateRequest has no signature_algorithms")
    return ParsedCertificateRequest(signature_algorithms, authorities)


def check_certificate_entry_extensions(
    extensions: Sequence[m.Extension], offered: Collection[int]
) -> None:
    check_response_extensions(
        extensions, CERTIFICATE_ENTRY_EXTENSIONS, offered, "CertificateEntry"
    )
