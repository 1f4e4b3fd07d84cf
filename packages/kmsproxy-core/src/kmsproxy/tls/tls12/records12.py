"""The TLS 1.2 record layer with AEAD protection (RFC 5246 section 6.2).

This module owns framing, the size limits, per-direction sequence numbers
and the two nonce constructions. AES-GCM uses an implicit salt plus an
8-byte explicit nonce carried in each record (RFC 5288 section 3), and
ChaCha20-Poly1305 uses its IV XOR the sequence number (RFC 7905 section 2). Unlike
TLS 1.3, every record type is protected once a key is set, including
change_cipher_spec during a renegotiation. `client12.py` decides which
record types a state allows and when keys change.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from ..alerts import BadRecordMac, DecodeError, RecordOverflow, UnexpectedMessage
from ..records import ContentType
from .key_schedule12 import Suite12

RECORD_HEADER_LENGTH = 5

# The record version of every TLS 1.2 record after the ServerHello, ours and
# the server's (RFC 5246 appendix E.1: the negotiated version).
TLS_1_2_RECORD_VERSION = 0x0303

# TLSPlaintext.length and the decrypted fragment must not exceed 2^14 bytes
# (RFC 5246 section 6.2.1).
MAX_PLAINTEXT_LENGTH = 2**14

# TLSCiphertext.length must not exceed 2^14 + 2048 bytes (RFC 5246 6.2.3).
MAX_CIPHERTEXT_LENGTH = 2**14 + 2048

# The authentication tag of AES-GCM and ChaCha20-Poly1305, in bytes.
TAG_LENGTH = 16

# A sequence number must not wrap (RFC 5246 section 6.1): 2^64 - 1.
MAX_SEQUENCE_NUMBER = 2**64 - 1

_CONTENT_TYPES = frozenset(
    {
        ContentType.change_cipher_spec,
        ContentType.alert,
        ContentType.handshake,
        ContentType.application_data,
    }
)


class RecordCipher12:
    """AEAD protection for one direction under one key (RFC 5246 6.2.3.3)."""

    def __init__(self, suite: Suite12, key: bytes, iv: bytes) -> None:
        self._suite = suite
        self._aead = suite.aead_factory(key)
        self._iv = iv
        self.sequence_number = 0

    def _next(self) -> tuple[int, bytes, bytes]:
        """Return (sequence number, nonce, explicit nonce) and advance."""
        sequence = self.sequence_number
        if sequence >= MAX_SEQUENCE_NUMBER:
            raise UnexpectedMessage("record sequence number would wrap")
        self.sequence_number += 1
        if self._suite.explicit_nonce_length:
            # RFC 5288 section 3: salt || nonce_explicit; the sequence number
            # is a nonce that never repeats under one key.
            explicit = sequence.to_bytes(self._suite.explicit_nonce_length, "big")
            return sequence, self._iv + explicit, explicit
        padded = sequence.to_bytes(len(self._iv), "big")
        nonce = bytes(a ^ b for a, b in zip(self._iv, padded, strict=True))
        return sequence, nonce, b""

    @property
    def overhead(self) -> int:
        """Bytes a protected record adds to its content."""
        return self._suite.explicit_nonce_length + TAG_LENGTH

    def seal(self, content_type: int, content: bytes | memoryview) -> bytes:
        """Encrypt one fragment into a whole TLSCiphertext record."""
        return b"".join(self.seal_parts(content_type, content))

    def seal_parts(
        self, content_type: int, content: bytes | memoryview
    ) -> tuple[bytes, bytes]:
        """Encrypt one fragment; return the record header with the explicit
        nonce, and the ciphertext, for `RecordLayer12.encode` to join."""
        if len(content) > MAX_PLAINTEXT_LENGTH:
            raise ValueError(f"record fragment of {len(content)} bytes is too long")
        sequence, nonce, explicit = self._next()
        ciphertext = self._aead.encrypt(
            nonce, content, _additional_data(sequence, content_type, len(content))
        )
        header = _header(content_type, len(explicit) + len(ciphertext))
        return header + explicit, ciphertext

    def open(self, content_type: int, body: bytes | memoryview) -> bytes:
        """Decrypt one record body; raise `BadRecordMac` on any failure.

        `body` may be a view into the receive buffer: it is read only during
        this call.
        """
        if len(body) < self.overhead:
            raise BadRecordMac(f"protected record of {len(body)} bytes is too short")
        sequence, nonce, _ = self._next()
        explicit_length = self._suite.explicit_nonce_length
        if explicit_length:
            nonce = self._iv + bytes(body[:explicit_length])
        plaintext_length = len(body) - explicit_length - TAG_LENGTH
        additional_data = _additional_data(sequence, content_type, plaintext_length)
        # The slice of a view is a view too: release it on every path, so no
        # traceback keeps the caller's buffer exported.
        with memoryview(body) as view, view[explicit_length:] as ciphertext:
            try:
                content = self._aead.decrypt(nonce, ciphertext, additional_data)
            except InvalidTag:
                raise BadRecordMac("record failed authentication") from None
        if len(content) > MAX_PLAINTEXT_LENGTH:
            raise RecordOverflow(
                f"decrypted record of {len(content)} bytes exceeds "
                f"{MAX_PLAINTEXT_LENGTH}"
            )
        return content


def _additional_data(sequence: int, content_type: int, length: int) -> bytes:
    # seq_num + TLSCompressed.type + version + length (RFC 5246 6.2.3.3).
    return sequence.to_bytes(8, "big") + _header(content_type, length)


def _header(content_type: int, length: int) -> bytes:
    return (
        bytes([content_type])
        + TLS_1_2_RECORD_VERSION.to_bytes(2, "big")
        + length.to_bytes(2, "big")
    )


class RecordLayer12:
    """Framing and protection of TLS 1.2 records in both directions.

    `feed` buffers received bytes and `next_record` returns one checked,
    decrypted (type, content) pair or None until a whole record arrived.
    The state machine installs `read_cipher` after the server's
    change_cipher_spec and `write_cipher` after ours.
    """

    def __init__(self) -> None:
        # Received bytes; those before `_start` are already framed. As in
        # the TLS 1.3 record layer, the buffer drops consumed records only
        # once it is empty or half consumed.
        self._buffer = bytearray()
        self._start = 0
        self.read_cipher: RecordCipher12 | None = None
        self.write_cipher: RecordCipher12 | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take_buffered(self) -> bytes:
        """Remove and return the bytes not yet framed as records."""
        data = bytes(self._buffer[self._start :])
        self._buffer.clear()
        self._start = 0
        return data

    def _consume(self, length: int) -> None:
        self._start += length
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        elif self._start > len(self._buffer) // 2:
            del self._buffer[: self._start]
            self._start = 0

    def next_record(self) -> tuple[int, bytes] | None:
        start = self._start
        if len(self._buffer) - start < RECORD_HEADER_LENGTH:
            return None
        content_type = self._buffer[start]
        version = int.from_bytes(self._buffer[start + 1 : start + 3], "big")
        length = int.from_bytes(self._buffer[start + 3 : start + 5], "big")
        if content_type not in _CONTENT_TYPES:
            raise UnexpectedMessage(f"unknown record content type {content_type}")
        if version != TLS_1_2_RECORD_VERSION:
            raise DecodeError(
                f"record version 0x{version:04x} in a TLS 1.2 connection, "
                "expected 0x0303"
            )
        limit = MAX_PLAINTEXT_LENGTH
        if self.read_cipher is not None:
            limit = MAX_CIPHERTEXT_LENGTH
        if length > limit:
            raise RecordOverflow(f"record length {length} exceeds {limit}")
        end = start + RECORD_HEADER_LENGTH + length
        if len(self._buffer) < end:
            return None
        if self.read_cipher is None:
            body = bytes(self._buffer[start + RECORD_HEADER_LENGTH : end])
        else:
            # Decrypt straight from the buffer. Both views are released on
            # every path, errors included, because a live view (one kept by
            # an exception's traceback, say) forbids resizing the buffer.
            body_start = start + RECORD_HEADER_LENGTH
            with (
                memoryview(self._buffer) as view,
                view[body_start:end] as ciphertext,
            ):
                body = self.read_cipher.open(content_type, ciphertext)
        self._consume(RECORD_HEADER_LENGTH + length)
        if not body and content_type != ContentType.application_data:
            # RFC 5246 section 6.2.1: only application data may be empty.
            raise DecodeError(f"empty {ContentType(content_type).name} record")
        return content_type, body

    def encode(self, content_type: int, content: bytes) -> bytes:
        """Split `content` into records of at most 2^14 bytes and protect
        them when a write key is set."""
        # Header and body of every record, joined once at the end. The
        # fragments are views, so `content` is copied only into the AEAD.
        parts: list[bytes] = []
        view = memoryview(content)
        for start in range(0, max(len(content), 1), MAX_PLAINTEXT_LENGTH):
            fragment = view[start : start + MAX_PLAINTEXT_LENGTH]
            if self.write_cipher is not None:
                parts += self.write_cipher.seal_parts(content_type, fragment)
            else:
                parts.append(_header(content_type, len(fragment)))
                parts.append(bytes(fragment))
        return b"".join(parts)
