"""TLS 1.3 handshake messages and extensions (RFC 8446 section 4).

Each message is a dataclass with a `pull_*` function that decodes its body
and a `push_*` function that encodes it, side by side. Extensions stay as an
ordered list of (type, raw data) so a message re-encodes byte for byte; the
`pull_*_extension` helpers decode one extension's data. Every vector bound
below is the one the RFC's presentation language declares, and decoders
raise only `Alert` subclasses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .alerts import DecodeError, IllegalParameter
from .buffers import Reader, encode_uint, encode_uint16_list, encode_vector


class HandshakeType(enum.IntEnum):
    """HandshakeType (RFC 8446 section 4)."""

    client_hello = 1
    server_hello = 2
    new_session_ticket = 4
    end_of_early_data = 5
    encrypted_extensions = 8
    certificate = 11
    certificate_request = 13
    certificate_verify = 15
    finished = 20
    key_update = 24
    message_hash = 254


class ExtensionType(enum.IntEnum):
    """ExtensionType code points this engine recognizes (RFC 8446 4.2)."""

    server_name = 0
    max_fragment_length = 1
    status_request = 5
    supported_groups = 10
    signature_algorithms = 13
    use_srtp = 14
    heartbeat = 15
    application_layer_protocol_negotiation = 16
    signed_certificate_timestamp = 18
    client_certificate_type = 19
    server_certificate_type = 20
    padding = 21
    record_size_limit = 28
    pre_shared_key = 41
    early_data = 42
    supported_versions = 43
    cookie = 44
    psk_key_exchange_modes = 45
    certificate_authorities = 47
    oid_filters = 48
    post_handshake_auth = 49
    signature_algorithms_cert = 50
    key_share = 51


class NamedGroup(enum.IntEnum):
    """NamedGroup code points (RFC 8446 section 4.2.7) this client supports."""

    secp256r1 = 0x0017
    secp384r1 = 0x0018
    secp521r1 = 0x0019
    x25519 = 0x001D
    # ML-KEM-768 combined with X25519 (draft-ietf-tls-ecdhe-mlkem).
    X25519MLKEM768 = 0x11EC


class PskKeyExchangeMode(enum.IntEnum):
    """PskKeyExchangeMode (RFC 8446 section 4.2.9)."""

    psk_ke = 0
    psk_dhe_ke = 1


class KeyUpdateRequest(enum.IntEnum):
    """KeyUpdateRequest (RFC 8446 section 4.6.3)."""

    update_not_requested = 0
    update_requested = 1


TLS_1_2 = 0x0303
TLS_1_3 = 0x0304

# ServerHello.random of a HelloRetryRequest: SHA-256("HelloRetryRequest")
# (RFC 8446 section 4.1.3).
HELLO_RETRY_REQUEST_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)

# The last 8 bytes of ServerHello.random when a TLS 1.3 server negotiates
# TLS 1.2 or TLS 1.1 and below (RFC 8446 section 4.1.3, "DOWNGRD" + 01/00).
DOWNGRADE_SENTINELS = (
    bytes.fromhex("444f574e47524401"),
    bytes.fromhex("444f574e47524400"),
)

HANDSHAKE_HEADER_LENGTH = 4
RANDOM_LENGTH = 32

# Largest handshake message we buffer: 100 KiB, the limit OpenSSL 3.0 puts
# on a peer's certificate list by default (SSL_MAX_CERT_LIST_DEFAULT in
# ssl.h). Certificate is normally the largest message a server sends.
MAX_HANDSHAKE_MESSAGE_LENGTH = 100 * 1024

Extension = tuple[int, bytes]


def pop_handshake_message(buffer: bytearray) -> bytes | None:
    """Remove and return the first whole handshake message in `buffer`.

    Return None while the message is incomplete. Raise `DecodeError` when
    its declared length exceeds `MAX_HANDSHAKE_MESSAGE_LENGTH`, before any
    more of it is buffered.
    """
    if len(buffer) < HANDSHAKE_HEADER_LENGTH:
        return None
    length = int.from_bytes(buffer[1:4], "big")
    if length > MAX_HANDSHAKE_MESSAGE_LENGTH:
        raise DecodeError(
            f"handshake message of {length} bytes exceeds the "
            f"{MAX_HANDSHAKE_MESSAGE_LENGTH}-byte limit"
        )
    end = HANDSHAKE_HEADER_LENGTH + length
    if len(buffer) < end:
        return None
    message = bytes(buffer[:end])
    del buffer[:end]
    return message


# Extensions


def pull_extensions(reader: Reader, minimum: int, maximum: int) -> list[Extension]:
    """Read `Extension extensions<minimum..maximum>`, rejecting duplicates.

    RFC 8446 section 4.2 forbids two extensions of one type in a block but
    names no alert for it, so this raises illegal_parameter.
    """
    block = reader.read_sub(2, minimum, maximum, f"{reader.label} extensions")
    extensions: list[Extension] = []
    seen: set[int] = set()
    while not block.at_end():
        extension_type = block.read_uint16()
        data = block.read_vector(2, 0, 2**16 - 1)
        if extension_type in seen:
            raise IllegalParameter(
                f"{reader.label} repeats extension {_extension_name(extension_type)}"
            )
        seen.add(extension_type)
        extensions.append((extension_type, data))
    return extensions


def push_extensions(extensions: list[Extension], minimum: int, maximum: int) -> bytes:
    body = b"".join(
        encode_uint(extension_type, 2) + encode_vector(data, 2, 0, 2**16 - 1)
        for extension_type, data in extensions
    )
    return encode_vector(body, 2, minimum, maximum)


def _extension_name(extension_type: int) -> str:
    try:
        return ExtensionType(extension_type).name
    except ValueError:
        return str(extension_type)


def find_extension(extensions: list[Extension], extension_type: int) -> bytes | None:
    for found_type, data in extensions:
        if found_type == extension_type:
            return data
    return None


def _whole(data: bytes, label: str) -> Reader:
    return Reader(data, label)


def push_server_name(host_name: str) -> bytes:
    """Encode ServerNameList with one host_name (RFC 6066 section 3)."""
    name = encode_uint(0, 1) + encode_vector(host_name.encode("ascii"), 2, 1, 2**16 - 1)
    return encode_vector(name, 2, 1, 2**16 - 1)


def pull_supported_versions_client(data: bytes) -> list[int]:
    reader = _whole(data, "supported_versions")
    versions_reader = reader.read_sub(1, 2, 254, "supported_versions")
    reader.expect_end()
    if versions_reader.remaining % 2:
        raise DecodeError("supported_versions: odd byte length")
    versions = []
    while not versions_reader.at_end():
        versions.append(versions_reader.read_uint16())
    return versions


def push_supported_versions_client(versions: list[int]) -> bytes:
    return encode_vector(b"".join(encode_uint(v, 2) for v in versions), 1, 2, 254)


def pull_uint16_extension(data: bytes, label: str) -> int:
    """Decode an extension whose data is one uint16 (selected_version,
    selected_group of a HelloRetryRequest)."""
    reader = _whole(data, label)
    value = reader.read_uint16()
    reader.expect_end()
    return value


def pull_uint16_list_extension(data: bytes, label: str, minimum: int) -> list[int]:
    """Decode `uint16 x<minimum..2^16-1>` (supported_groups) or
    `<minimum..2^16-2>` (signature_algorithms)."""
    reader = _whole(data, label)
    values = reader.read_uint16_list(minimum, 2**16 - 1, label)
    reader.expect_end()
    return values


def push_uint16_list_extension(values: list[int]) -> bytes:
    return encode_uint16_list(values, 2, 2**16 - 2)


@dataclass(frozen=True)
class KeyShareEntry:
    group: int
    key_exchange: bytes


def _pull_key_share_entry(reader: Reader) -> KeyShareEntry:
    group = reader.read_uint16()
    key_exchange = reader.read_vector(2, 1, 2**16 - 1)
    return KeyShareEntry(group, key_exchange)


def _push_key_share_entry(entry: KeyShareEntry) -> bytes:
    return encode_uint(entry.group, 2) + encode_vector(
        entry.key_exchange, 2, 1, 2**16 - 1
    )


def pull_key_share_client(data: bytes) -> list[KeyShareEntry]:
    reader = _whole(data, "key_share")
    shares_reader = reader.read_sub(2, 0, 2**16 - 1, "key_share")
    reader.expect_end()
    shares = []
    while not shares_reader.at_end():
        shares.append(_pull_key_share_entry(shares_reader))
    return shares


def push_key_share_client(shares: list[KeyShareEntry]) -> bytes:
    body = b"".join(_push_key_share_entry(entry) for entry in shares)
    return encode_vector(body, 2, 0, 2**16 - 1)


def pull_key_share_server(data: bytes) -> KeyShareEntry:
    reader = _whole(data, "key_share")
    entry = _pull_key_share_entry(reader)
    reader.expect_end()
    return entry


def push_key_share_server(entry: KeyShareEntry) -> bytes:
    return _push_key_share_entry(entry)


def pull_alpn(data: bytes) -> list[bytes]:
    """Decode ProtocolNameList (RFC 7301 section 3.1)."""
    reader = _whole(data, "application_layer_protocol_negotiation")
    names_reader = reader.read_sub(2, 2, 2**16 - 1, reader.label)
    reader.expect_end()
    names = []
    while not names_reader.at_end():
        names.append(names_reader.read_vector(1, 1, 255))
    return names


def push_alpn(names: list[bytes]) -> bytes:
    body = b"".join(encode_vector(name, 1, 1, 255) for name in names)
    return encode_vector(body, 2, 2, 2**16 - 1)


def pull_cookie(data: bytes) -> bytes:
    reader = _whole(data, "cookie")
    cookie = reader.read_vector(2, 1, 2**16 - 1)
    reader.expect_end()
    return cookie


def push_cookie(cookie: bytes) -> bytes:
    return encode_vector(cookie, 2, 1, 2**16 - 1)


def pull_certificate_authorities(data: bytes) -> list[bytes]:
    """Decode `DistinguishedName authorities<3..2^16-1>` (RFC 8446 4.2.4);
    each name is DER."""
    reader = _whole(data, "certificate_authorities")
    names_reader = reader.read_sub(2, 3, 2**16 - 1, reader.label)
    reader.expect_end()
    names = []
    while not names_reader.at_end():
        names.append(names_reader.read_vector(2, 1, 2**16 - 1))
    return names


def push_certificate_authorities(names: list[bytes]) -> bytes:
    body = b"".join(encode_vector(name, 2, 1, 2**16 - 1) for name in names)
    return encode_vector(body, 2, 3, 2**16 - 1)


def push_psk_key_exchange_modes(modes: list[PskKeyExchangeMode]) -> bytes:
    return encode_vector(bytes(modes), 1, 1, 255)


def pull_psk_key_exchange_modes(data: bytes) -> list[int]:
    reader = _whole(data, "psk_key_exchange_modes")
    modes = reader.read_vector(1, 1, 255)
    reader.expect_end()
    return list(modes)


@dataclass(frozen=True)
class PskIdentity:
    identity: bytes
    obfuscated_ticket_age: int


@dataclass(frozen=True)
class OfferedPsks:
    """The client's pre_shared_key extension (RFC 8446 section 4.2.11)."""

    identities: list[PskIdentity]
    binders: list[bytes]


def push_psk_binders(binders: list[bytes]) -> bytes:
    """Encode `PskBinderEntry binders<33..2^16-1>`, the tail of the
    ClientHello that the binders themselves do not cover."""
    body = b"".join(encode_vector(binder, 1, 32, 255) for binder in binders)
    return encode_vector(body, 2, 33, 2**16 - 1)


def push_offered_psks(offered: OfferedPsks) -> bytes:
    identities = b"".join(
        encode_vector(entry.identity, 2, 1, 2**16 - 1)
        + encode_uint(entry.obfuscated_ticket_age, 4)
        for entry in offered.identities
    )
    return encode_vector(identities, 2, 7, 2**16 - 1) + push_psk_binders(
        offered.binders
    )


def pull_offered_psks(data: bytes) -> OfferedPsks:
    reader = _whole(data, "pre_shared_key")
    identities_reader = reader.read_sub(2, 7, 2**16 - 1, "identities")
    binders_reader = reader.read_sub(2, 33, 2**16 - 1, "binders")
    reader.expect_end()
    identities = []
    while not identities_reader.at_end():
        identity = identities_reader.read_vector(2, 1, 2**16 - 1)
        identities.append(PskIdentity(identity, identities_reader.read_uint(4)))
    binders = []
    while not binders_reader.at_end():
        binders.append(binders_reader.read_vector(1, 32, 255))
    if len(binders) != len(identities):
        raise IllegalParameter(
            f"pre_shared_key has {len(identities)} identities but "
            f"{len(binders)} binders"
        )
    return OfferedPsks(identities, binders)


# Handshake framing


def encode_handshake(message_type: HandshakeType, body: bytes) -> bytes:
    """Prefix a body with its Handshake header (type, uint24 length)."""
    return bytes([message_type]) + encode_uint(len(body), 3) + body


# Messages


@dataclass
class ClientHello:
    random: bytes
    legacy_session_id: bytes
    cipher_suites: list[int]
    extensions: list[Extension]
    legacy_version: int = TLS_1_2
    legacy_compression_methods: bytes = b"\x00"


def pull_client_hello(body: bytes) -> ClientHello:
    reader = Reader(body, "ClientHello")
    legacy_version = reader.read_uint16()
    random = reader.read_bytes(RANDOM_LENGTH)
    session_id = reader.read_vector(1, 0, 32)
    suites = reader.read_uint16_list(2, 2**16 - 2, "cipher_suites")
    compression = reader.read_vector(1, 1, 255)
    extensions = pull_extensions(reader, 8, 2**16 - 1)
    reader.expect_end()
    return ClientHello(
        random, session_id, suites, extensions, legacy_version, compression
    )


def push_client_hello(hello: ClientHello) -> bytes:
    return encode_handshake(
        HandshakeType.client_hello,
        encode_uint(hello.legacy_version, 2)
        + hello.random
        + encode_vector(hello.legacy_session_id, 1, 0, 32)
        + encode_uint16_list(hello.cipher_suites, 2, 2**16 - 2)
        + encode_vector(hello.legacy_compression_methods, 1, 1, 255)
        + push_extensions(hello.extensions, 8, 2**16 - 1),
    )


@dataclass
class ServerHello:
    """ServerHello, or a HelloRetryRequest when `random` is the HRR value.

    `extensions` is None only for a TLS 1.2-or-older ServerHello that omits
    the block, which TLS 1.2 allows (RFC 5246 section 7.4.1.3).
    """

    random: bytes
    legacy_session_id_echo: bytes
    cipher_suite: int
    extensions: list[Extension] | None
    legacy_version: int = TLS_1_2
    legacy_compression_method: int = 0

    @property
    def is_hello_retry_request(self) -> bool:
        return self.random == HELLO_RETRY_REQUEST_RANDOM


def pull_server_hello(body: bytes) -> ServerHello:
    reader = Reader(body, "ServerHello")
    legacy_version = reader.read_uint16()
    random = reader.read_bytes(RANDOM_LENGTH)
    session_id = reader.read_vector(1, 0, 32)
    cipher_suite = reader.read_uint16()
    compression = reader.read_uint8()
    extensions = None
    if not reader.at_end():
        extensions = pull_extensions(reader, 0, 2**16 - 1)
    reader.expect_end()
    return ServerHello(
        random, session_id, cipher_suite, extensions, legacy_version, compression
    )


def push_server_hello(hello: ServerHello) -> bytes:
    body = (
        encode_uint(hello.legacy_version, 2)
        + hello.random
        + encode_vector(hello.legacy_session_id_echo, 1, 0, 32)
        + encode_uint(hello.cipher_suite, 2)
        + encode_uint(hello.legacy_compression_method, 1)
    )
    if hello.extensions is not None:
        body += push_extensions(hello.extensions, 0, 2**16 - 1)
    return encode_handshake(HandshakeType.server_hello, body)


@dataclass
class EncryptedExtensions:
    extensions: list[Extension] = field(default_factory=list)


def pull_encrypted_extensions(body: bytes) -> EncryptedExtensions:
    reader = Reader(body, "EncryptedExtensions")
    extensions = pull_extensions(reader, 0, 2**16 - 1)
    reader.expect_end()
    return EncryptedExtensions(extensions)


def push_encrypted_extensions(message: EncryptedExtensions) -> bytes:
    return encode_handshake(
        HandshakeType.encrypted_extensions,
        push_extensions(message.extensions, 0, 2**16 - 1),
    )


@dataclass
class CertificateRequest:
    certificate_request_context: bytes
    extensions: list[Extension]


def pull_certificate_request(body: bytes) -> CertificateRequest:
    reader = Reader(body, "CertificateRequest")
    context = reader.read_vector(1, 0, 255)
    extensions = pull_extensions(reader, 2, 2**16 - 1)
    reader.expect_end()
    return CertificateRequest(context, extensions)


def push_certificate_request(message: CertificateRequest) -> bytes:
    return encode_handshake(
        HandshakeType.certificate_request,
        encode_vector(message.certificate_request_context, 1, 0, 255)
        + push_extensions(message.extensions, 2, 2**16 - 1),
    )


@dataclass
class CertificateEntry:
    cert_data: bytes
    extensions: list[Extension] = field(default_factory=list)


@dataclass
class Certificate:
    certificate_request_context: bytes
    certificate_list: list[CertificateEntry]


def pull_certificate(body: bytes) -> Certificate:
    reader = Reader(body, "Certificate")
    context = reader.read_vector(1, 0, 255)
    entries_reader = reader.read_sub(3, 0, 2**24 - 1, "certificate_list")
    reader.expect_end()
    entries = []
    while not entries_reader.at_end():
        cert_data = entries_reader.read_vector(3, 1, 2**24 - 1)
        extensions = pull_extensions(entries_reader, 0, 2**16 - 1)
        entries.append(CertificateEntry(cert_data, extensions))
    return Certificate(context, entries)


def push_certificate(message: Certificate) -> bytes:
    entries = b"".join(
        encode_vector(entry.cert_data, 3, 1, 2**24 - 1)
        + push_extensions(entry.extensions, 0, 2**16 - 1)
        for entry in message.certificate_list
    )
    return encode_handshake(
        HandshakeType.certificate,
        encode_vector(message.certificate_request_context, 1, 0, 255)
        + encode_vector(entries, 3, 0, 2**24 - 1),
    )


@dataclass
class CertificateVerify:
    algorithm: int
    signature: bytes


def pull_certificate_verify(body: bytes) -> CertificateVerify:
    reader = Reader(body, "CertificateVerify")
    algorithm = reader.read_uint16()
    signature = reader.read_vector(2, 0, 2**16 - 1)
    reader.expect_end()
    return CertificateVerify(algorithm, signature)


def push_certificate_verify(message: CertificateVerify) -> bytes:
    return encode_handshake(
        HandshakeType.certificate_verify,
        encode_uint(message.algorithm, 2)
        + encode_vector(message.signature, 2, 0, 2**16 - 1),
    )


@dataclass
class Finished:
    verify_data: bytes


def pull_finished(body: bytes, hash_length: int) -> Finished:
    if len(body) != hash_length:
        raise DecodeError(
            f"Finished of {len(body)} bytes, expected the hash length {hash_length}"
        )
    return Finished(body)


def push_finished(message: Finished) -> bytes:
    return encode_handshake(HandshakeType.finished, message.verify_data)


@dataclass
class NewSessionTicket:
    ticket_lifetime: int
    ticket_age_add: int
    ticket_nonce: bytes
    ticket: bytes
    extensions: list[Extension] = field(default_factory=list)


def pull_new_session_ticket(body: bytes) -> NewSessionTicket:
    reader = Reader(body, "NewSessionTicket")
    lifetime = reader.read_uint(4)
    age_add = reader.read_uint(4)
    nonce = reader.read_vector(1, 0, 255)
    ticket = reader.read_vector(2, 1, 2**16 - 1)
    extensions = pull_extensions(reader, 0, 2**16 - 2)
    reader.expect_end()
    return NewSessionTicket(lifetime, age_add, nonce, ticket, extensions)


def push_new_session_ticket(message: NewSessionTicket) -> bytes:
    return encode_handshake(
        HandshakeType.new_session_ticket,
        encode_uint(message.ticket_lifetime, 4)
        + encode_uint(message.ticket_age_add, 4)
        + encode_vector(message.ticket_nonce, 1, 0, 255)
        + encode_vector(message.ticket, 2, 1, 2**16 - 1)
        + push_extensions(message.extensions, 0, 2**16 - 2),
    )


@dataclass
class KeyUpdate:
    request_update: KeyUpdateRequest


def pull_key_update(body: bytes) -> KeyUpdate:
    reader = Reader(body, "KeyUpdate")
    value = reader.read_uint8()
    reader.expect_end()
    try:
        return KeyUpdate(KeyUpdateRequest(value))
    except ValueError:
        raise IllegalParameter(
            f"KeyUpdate request_update {value} is not 0 or 1"
        ) from None


def push_key_update(message: KeyUpdate) -> bytes:
    return encode_handshake(HandshakeType.key_update, bytes([message.request_update]))
