"""The TLS 1.3 record layer (RFC 8446 section 5).

This module owns record framing, the size limits, record protection (one AEAD
object per traffic key, reused for every record), per-direction sequence
numbers and nonces, and the inner content type with its zero padding. It does
not know which record types a handshake state allows; `client.py` decides.
"""

from __future__ import annotations

import enum

from cryptography.exceptions import InvalidTag

from .alerts import BadRecordMac, DecodeError, RecordOverflow, UnexpectedMessage
from .key_schedule import IV_LENGTH, TAG_LENGTH, SuiteParameters, traffic_keys


class ContentType(enum.IntEnum):
    """ContentType (RFC 8446 section 5.1)."""

    invalid = 0
    change_cipher_spec = 20
    alert = 21
    handshake = 22
    application_data = 23


RECORD_HEADER_LENGTH = 5

# TLSPlaintext.length and TLSInnerPlaintext content must not exceed 2^14 bytes
# (RFC 8446 section 5.1 and 5.2).
MAX_PLAINTEXT_LENGTH = 2**14

# TLSCiphertext.length must not exceed 2^14 + 256 bytes (RFC 8446 section 5.2):
# the content, the inner type byte, padding and the AEAD expansion.
MAX_CIPHERTEXT_LENGTH = 2**14 + 256

# legacy_record_version of every record this client writes (RFC 8446 5.1).
# The first ClientHello may use 0x0301, but 0x0303 is also allowed there, so
# one value serves every record. Receivers ignore the field.
LEGACY_RECORD_VERSION = 0x0303

# A sequence number must never wrap (RFC 8446 section 5.3); this is 2^64 - 1.
MAX_SEQUENCE_NUMBER = 2**64 - 1


class RecordCipher:
    """Protection for one direction under one traffic secret."""

    def __init__(self, suite: SuiteParameters, secret: bytes) -> None:
        keys = traffic_keys(suite, secret)
        self.secret = secret
        self._aead = suite.aead_factory(keys.key)
        self._iv = int.from_bytes(keys.iv, "big")
        self.sequence_number = 0

    def _next_nonce(self) -> bytes:
        # RFC 8446 section 5.3: the 64-bit sequence number, left-padded to the
        # IV length, XOR the static IV.
        if self.sequence_number >= MAX_SEQUENCE_NUMBER:
            raise UnexpectedMessage("record sequence number would wrap; rekey first")
        nonce = (self._iv ^ self.sequence_number).to_bytes(IV_LENGTH, "big")
        self.sequence_number += 1
        return nonce

    def seal(
        self, content_type: ContentType, content: bytes, padding_length: int = 0
    ) -> bytes:
        """Encrypt one TLSInnerPlaintext into a whole TLSCiphertext record."""
        return b"".join(self.seal_parts(content_type, content, padding_length))

    def seal_parts(
        self,
        content_type: ContentType,
        content: bytes | memoryview,
        padding_length: int = 0,
    ) -> tuple[bytes, bytes]:
        """Encrypt one TLSInnerPlaintext; return the record header and body.

        Returning the two parts lets `RecordLayer.encode` join all records
        of a write with one copy.
        """
        inner = b"".join((content, _CONTENT_TYPE_BYTES[content_type]))
        if padding_length:
            inner += bytes(padding_length)
        if len(inner) > MAX_PLAINTEXT_LENGTH + 1:
            raise ValueError(f"inner plaintext of {len(inner)} bytes is too long")
        length = len(inner) + TAG_LENGTH
        header = _APPLICATION_DATA_BYTE + _version_and_length(length)
        return header, self._aead.encrypt(self._next_nonce(), inner, header)

    def open(self, header: bytes, ciphertext: bytes | memoryview) -> tuple[int, bytes]:
        """Decrypt one record; return (inner content type, content).

        `ciphertext` may be a view into the receive buffer: it is read only
        during this call.
        """
        try:
            inner = self._aead.decrypt(self._next_nonce(), ciphertext, header)
        except InvalidTag:
            raise BadRecordMac("record failed authentication") from None
        # The content type is the last non-zero byte; zeros after it are
        # padding (RFC 8446 section 5.4). Records without padding, the
        # usual case, skip the search and its copy.
        stripped = inner if inner[-1:] != b"\x00" else inner.rstrip(b"\x00")
        if not stripped:
            raise UnexpectedMessage("protected record has no non-zero content type")
        content = stripped[:-1]
        if len(content) > MAX_PLAINTEXT_LENGTH:
            raise RecordOverflow(
                f"decrypted record content of {len(content)} bytes exceeds "
                f"{MAX_PLAINTEXT_LENGTH}"
            )
        return stripped[-1], content


# The inner content type byte of each ContentType, built once instead of per
# record.
_CONTENT_TYPE_BYTES = {member: bytes([member]) for member in ContentType}
_APPLICATION_DATA_BYTE = _CONTENT_TYPE_BYTES[ContentType.application_data]


def _version_and_length(length: int) -> bytes:
    return LEGACY_RECORD_VERSION.to_bytes(2, "big") + length.to_bytes(2, "big")


class RecordLayer:
    """Framing and protection of records in both directions.

    `feed` buffers received bytes; `next_record` returns one decrypted record
    or None until a whole one has arrived. `encode` splits content into
    records of at most 2^14 bytes and protects them when a write key is set.
    """

    def __init__(self) -> None:
        # Received bytes; those before `_start` are already framed. Records
        # are consumed by moving `_start`, and the buffer drops them only
        # once it is empty or half consumed, so a large read of many
        # records is not moved in memory once per record.
        self._buffer = bytearray()
        self._start = 0
        self.read_cipher: RecordCipher | None = None
        self.write_cipher: RecordCipher | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take_buffered(self) -> bytes:
        """Remove and return the bytes not yet framed as records, for the
        TLS 1.2 machine that takes over the connection."""
        data = bytes(self._buffer[self._start :])
        self._buffer.clear()
        self._start = 0
        return data

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._start

    def _consume(self, length: int) -> None:
        self._start += length
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        elif self._start > len(self._buffer) // 2:
            del self._buffer[: self._start]
            self._start = 0

    def next_record(self) -> tuple[int, bytes] | None:
        """Return (content type, content) of the next whole record, or None.

        A change_cipher_spec record is returned as received, even under
        protection, so the caller can apply RFC 8446 section 5's rule to it.
        """
        start = self._start
        if len(self._buffer) - start < RECORD_HEADER_LENGTH:
            return None
        header = bytes(self._buffer[start : start + RECORD_HEADER_LENGTH])
        outer_type = header[0]
        length = int.from_bytes(header[3:5], "big")
        protected = (
            self.read_cipher is not None and outer_type == ContentType.application_data
        )
        limit = MAX_CIPHERTEXT_LENGTH if protected else MAX_PLAINTEXT_LENGTH
        if length > limit:
            raise RecordOverflow(f"record length {length} exceeds {limit}")
        if outer_type not in (
            ContentType.change_cipher_spec,
            ContentType.alert,
            ContentType.handshake,
            ContentType.application_data,
        ):
            raise UnexpectedMessage(f"unknown record content type {outer_type}")
        end = start + RECORD_HEADER_LENGTH + length
        if len(self._buffer) < end:
            return None

        if not protected:
            body = bytes(self._buffer[start + RECORD_HEADER_LENGTH : end])
            self._consume(RECORD_HEADER_LENGTH + length)
            return self._check_unprotected(outer_type, body)
        if length < TAG_LENGTH + 1:
            raise BadRecordMac(f"protected record of {length} bytes is too short")
        assert self.read_cipher is not None  # implied by `protected`
        # Decrypt straight from the buffer. Both views are released on
        # every path, errors included, because a live view (one kept by an
        # exception's traceback, say) forbids resizing the buffer.
        body_start = start + RECORD_HEADER_LENGTH
        with (
            memoryview(self._buffer) as view,
            view[body_start:end] as ciphertext,
        ):
            content_type, content = self.read_cipher.open(header, ciphertext)
        self._consume(RECORD_HEADER_LENGTH + length)
        if content_type not in (
            ContentType.alert,
            ContentType.handshake,
            ContentType.application_data,
        ):
            raise UnexpectedMessage(
                f"content type {content_type} is not allowed inside protection"
            )
        if not content and content_type != ContentType.application_data:
            raise DecodeError(f"empty {ContentType(content_type).name} record")
        return content_type, content

    def _check_unprotected(self, outer_type: int, body: bytes) -> tuple[int, bytes]:
        """Apply the rules for a record received without protection."""
        if outer_type == ContentType.change_cipher_spec:
            return outer_type, body
        if self.read_cipher is None:
            if outer_type == ContentType.application_data:
                raise UnexpectedMessage("application data before any traffic key")
            if not body:
                raise DecodeError(f"empty {ContentType(outer_type).name} record")
            return outer_type, body
        raise UnexpectedMessage(
            f"unprotected {ContentType(outer_type).name} record after keys "
            "were established"
        )

    def encode(
        self, content_type: ContentType, content: bytes, *, protect: bool = True
    ) -> bytes:
        """Split `content` into records and protect them if a write key is set.

        `protect=False` is for the change_cipher_spec record, which is always
        sent in the clear (RFC 8446 section 5).
        """
        # Header and body of every record, joined once at the end. The
        # fragments are views, so `content` is copied only into the AEAD.
        parts: list[bytes] = []
        view = memoryview(content)
        for start in range(0, max(len(content), 1), MAX_PLAINTEXT_LENGTH):
            fragment = view[start : start + MAX_PLAINTEXT_LENGTH]
            if self.write_cipher is not None and protect:
                parts += self.write_cipher.seal_parts(content_type, fragment)
            else:
                parts.append(bytes([content_type]) + _version_and_length(len(fragment)))
                parts.append(bytes(fragment))
        return b"".join(parts)
