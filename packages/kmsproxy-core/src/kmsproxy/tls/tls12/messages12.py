"""The handshake messages and extensions TLS 1.2 adds (RFC 5246 section 7.4,
RFC 8422, RFC 5077, RFC 5746, RFC 7627).

ClientHello, ServerHello and CertificateVerify keep the form `messages.py`
decodes; this module contains what differs in 1.2. Each message has a `pull_*`
decoder beside its `push_*` encoder, every vector bound is the one the RFC
declares, and decoders raise only `Alert` subclasses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..alerts import DecodeError, IllegalParameter
from ..buffers import Reader, encode_uint, encode_uint16_list, encode_vector
from .key_schedule12 import VERIFY_DATA_LENGTH


class HandshakeType12(enum.IntEnum):
    """HandshakeType values of a TLS 1.2 handshake (RFC 5246 section 7.4)."""

    hello_request = 0
    client_hello = 1
    server_hello = 2
    new_session_ticket = 4
    certificate = 11
    server_key_exchange = 12
    certificate_request = 13
    server_hello_done = 14
    certificate_verify = 15
    client_key_exchange = 16
    finished = 20


class ExtensionType12(enum.IntEnum):
    """Extensions a TLS 1.2 hello carries beyond those of TLS 1.3."""

    ec_point_formats = 11
    extended_master_secret = 23
    session_ticket = 35
    renegotiation_info = 0xFF01


class ClientCertificateType(enum.IntEnum):
    """certificate_types of a CertificateRequest (RFC 5246 7.4.4, RFC 8422)."""

    rsa_sign = 1
    ecdsa_sign = 64


# ECCurveType.named_curve, the only curve type RFC 8422 section 5.4 allows.
NAMED_CURVE = 3

# ECPointFormat.uncompressed, the only format RFC 8422 section 5.1.2 allows.
UNCOMPRESSED = 0


def encode_handshake12(message_type: HandshakeType12, body: bytes) -> bytes:
    """Prefix a body with its Handshake header (type, uint24 length)."""
    return bytes([message_type]) + encode_uint(len(body), 3) + body


def pull_empty(body: bytes, name: str) -> None:
    """Check that a message without content (HelloRequest, ServerHelloDone)
    has none."""
    if body:
        raise DecodeError(f"{name} has {len(body)} bytes, expected none")


# Extensions


def push_ec_point_formats() -> bytes:
    return encode_vector(bytes([UNCOMPRESSED]), 1, 1, 255)


def pull_ec_point_formats(data: bytes) -> list[int]:
    reader = Reader(data, "ec_point_formats")
    formats = list(reader.read_vector(1, 1, 255))
    reader.expect_end()
    if UNCOMPRESSED not in formats:
        # RFC 8422 section 5.2: the list must contain uncompressed.
        raise IllegalParameter("ec_point_formats lacks the uncompressed format")
    return formats


def push_renegotiation_info(renegotiated_connection: bytes) -> bytes:
    """Encode `opaque renegotiated_connection<0..255>` (RFC 5746 3.2)."""
    return encode_vector(renegotiated_connection, 1, 0, 255)


def pull_renegotiation_info(data: bytes) -> bytes:
    reader = Reader(data, "renegotiation_info")
    value = reader.read_vector(1, 0, 255)
    reader.expect_end()
    return value


# Messages


@dataclass
class Certificate12:
    """Certificate: `ASN.1Cert certificate_list<0..2^24-1>` (RFC 5246 7.4.2)."""

    certificate_list: list[bytes]


def pull_certificate12(body: bytes) -> Certificate12:
    reader = Reader(body, "Certificate")
    entries = reader.read_sub(3, 0, 2**24 - 1, "certificate_list")
    reader.expect_end()
    certificates = []
    while not entries.at_end():
        certificates.append(entries.read_vector(3, 1, 2**24 - 1))
    return Certificate12(certificates)


def push_certificate12(message: Certificate12) -> bytes:
    entries = b"".join(
        encode_vector(cert, 3, 1, 2**24 - 1) for cert in message.certificate_list
    )
    return encode_handshake12(
        HandshakeType12.certificate, encode_vector(entries, 3, 0, 2**24 - 1)
    )


@dataclass
class ServerKeyExchange:
    """ServerKeyExchange for ECDHE with a named curve (RFC 8422 5.4).

    `params` is the encoded ServerECDHParams, which the signature covers
    after the two hello randoms.
    """

    named_curve: int
    public: bytes
    algorithm: int
    signature: bytes

    @property
    def params(self) -> bytes:
        return (
            bytes([NAMED_CURVE])
            + encode_uint(self.named_curve, 2)
            + encode_vector(self.public, 1, 1, 255)
        )


def pull_server_key_exchange(body: bytes) -> ServerKeyExchange:
    reader = Reader(body, "ServerKeyExchange")
    curve_type = reader.read_uint8()
    if curve_type != NAMED_CURVE:
        raise IllegalParameter(
            f"ServerKeyExchange curve_type {curve_type}, expected named_curve (3)"
        )
    named_curve = reader.read_uint16()
    public = reader.read_vector(1, 1, 255)
    algorithm = reader.read_uint16()
    signature = reader.read_vector(2, 0, 2**16 - 1)
    reader.expect_end()
    return ServerKeyExchange(named_curve, public, algorithm, signature)


def push_server_key_exchange(message: ServerKeyExchange) -> bytes:
    return encode_handshake12(
        HandshakeType12.server_key_exchange,
        message.params
        + encode_uint(message.algorithm, 2)
        + encode_vector(message.signature, 2, 0, 2**16 - 1),
    )


@dataclass
class CertificateRequest12:
    """The TLS 1.2 CertificateRequest (RFC 5246 section 7.4.4)."""

    certificate_types: bytes
    signature_algorithms: list[int]
    certificate_authorities: list[bytes]


def pull_certificate_request12(body: bytes) -> CertificateRequest12:
    reader = Reader(body, "CertificateRequest")
    types = reader.read_vector(1, 1, 255)
    schemes = reader.read_uint16_list(2, 2**16 - 2, "supported_signature_algorithms")
    names_reader = reader.read_sub(2, 0, 2**16 - 1, "certificate_authorities")
    reader.expect_end()
    names = []
    while not names_reader.at_end():
        names.append(names_reader.read_vector(2, 1, 2**16 - 1))
    return CertificateRequest12(types, schemes, names)


def push_certificate_request12(message: CertificateRequest12) -> bytes:
    names = b"".join(
        encode_vector(name, 2, 1, 2**16 - 1) for name in message.certificate_authorities
    )
    return encode_handshake12(
        HandshakeType12.certificate_request,
        encode_vector(message.certificate_types, 1, 1, 255)
        + encode_uint16_list(message.signature_algorithms, 2, 2**16 - 2)
        + encode_vector(names, 2, 0, 2**16 - 1),
    )


def push_client_key_exchange(public: bytes) -> bytes:
    """ClientKeyExchange with our ECDH point (RFC 8422 section 5.7)."""
    return encode_handshake12(
        HandshakeType12.client_key_exchange, encode_vector(public, 1, 1, 255)
    )


def pull_client_key_exchange(body: bytes) -> bytes:
    reader = Reader(body, "ClientKeyExchange")
    public = reader.read_vector(1, 1, 255)
    reader.expect_end()
    return public


@dataclass
class NewSessionTicket12:
    """NewSessionTicket (RFC 5077 section 3.3); the hint is in seconds and
    0 means unspecified."""

    ticket_lifetime_hint: int
    ticket: bytes


def pull_new_session_ticket12(body: bytes) -> NewSessionTicket12:
    reader = Reader(body, "NewSessionTicket")
    hint = reader.read_uint(4)
    ticket = reader.read_vector(2, 0, 2**16 - 1)
    reader.expect_end()
    return NewSessionTicket12(hint, ticket)


def push_new_session_ticket12(message: NewSessionTicket12) -> bytes:
    return encode_handshake12(
        HandshakeType12.new_session_ticket,
        encode_uint(message.ticket_lifetime_hint, 4)
        + encode_vector(message.ticket, 2, 0, 2**16 - 1),
    )


def pull_finished12(body: bytes) -> bytes:
    if len(body) != VERIFY_DATA_LENGTH:
        raise DecodeError(
            f"Finished of {len(body)} bytes, expected {VERIFY_DATA_LENGTH}"
        )
    return body


def push_finished12(verify_data: bytes) -> bytes:
    return encode_handshake12(HandshakeType12.finished, verify_data)


def push_hello_request() -> bytes:
    return encode_handshake12(HandshakeType12.hello_request, b"")


def push_server_hello_done() -> bytes:
    return encode_handshake12(HandshakeType12.server_hello_done, b"")
