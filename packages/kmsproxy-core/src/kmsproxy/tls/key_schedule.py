"""The TLS 1.3 key schedule (RFC 8446 section 7) and cipher suite parameters.

`KeySchedule` walks Early Secret -> Handshake Secret -> Master Secret and
derives every traffic secret from the transcript hash that `Transcript`
keeps. Nothing here touches records or I/O.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .buffers import encode_vector

AEAD = AESGCM | ChaCha20Poly1305

# HkdfLabel.label is opaque label<7..255> and includes the "tls13 " prefix.
_LABEL_PREFIX = b"tls13 "


class CipherSuite(enum.IntEnum):
    """TLS 1.3 cipher suites this client offers (RFC 8446 appendix B.4)."""

    TLS_AES_128_GCM_SHA256 = 0x1301
    TLS_AES_256_GCM_SHA384 = 0x1302
    TLS_CHACHA20_POLY1305_SHA256 = 0x1303


@dataclass(frozen=True)
class SuiteParameters:
    """The hash, AEAD and key length a cipher suite fixes."""

    hash_factory: Callable[[], hashes.HashAlgorithm]
    hash_name: str
    key_length: int
    aead_factory: Callable[[bytes], AEAD]

    @property
    def hash_length(self) -> int:
        return self.hash_factory().digest_size


# Every TLS 1.3 AEAD here uses a 12-byte nonce (RFC 8446 section 5.3: the
# per-record nonce is max(8, N_MIN) = 12 bytes for these AEADs).
IV_LENGTH = 12

# The authentication tag length of AES-GCM and ChaCha20-Poly1305, in bytes.
TAG_LENGTH = 16

SUITES: dict[CipherSuite, SuiteParameters] = {
    CipherSuite.TLS_AES_128_GCM_SHA256: SuiteParameters(
        hashes.SHA256, "sha256", 16, AESGCM
    ),
    CipherSuite.TLS_AES_256_GCM_SHA384: SuiteParameters(
        hashes.SHA384, "sha384", 32, AESGCM
    ),
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: SuiteParameters(
        hashes.SHA256, "sha256", 32, ChaCha20Poly1305
    ),
}


def hkdf_extract(suite: SuiteParameters, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 section 2.2): HMAC-Hash(salt, IKM)."""
    return hmac.new(salt, ikm, suite.hash_name).digest()


def hkdf_expand_label(
    suite: SuiteParameters, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label (RFC 8446 section 7.1)."""
    hkdf_label = (
        length.to_bytes(2, "big")
        + encode_vector(_LABEL_PREFIX + label, 1, 7, 255)
        + encode_vector(context, 1, 0, 255)
    )
    expand = HKDFExpand(suite.hash_factory(), length, hkdf_label)
    return expand.derive(secret)


def transcript_digest(suite: SuiteParameters, data: bytes) -> bytes:
    digest = hashes.Hash(suite.hash_factory())
    digest.update(data)
    return digest.finalize()


def derive_secret(
    suite: SuiteParameters, secret: bytes, label: bytes, transcript_hash: bytes
) -> bytes:
    """Derive-Secret (RFC 8446 section 7.1) from an already computed hash."""
    return hkdf_expand_label(suite, secret, label, transcript_hash, suite.hash_length)


@dataclass(frozen=True)
class TrafficKeys:
    """The write key and IV derived from one traffic secret (section 7.3)."""

    key: bytes
    iv: bytes


def traffic_keys(suite: SuiteParameters, secret: bytes) -> TrafficKeys:
    return TrafficKeys(
        key=hkdf_expand_label(suite, secret, b"key", b"", suite.key_length),
        iv=hkdf_expand_label(suite, secret, b"iv", b"", IV_LENGTH),
    )


def finished_key(suite: SuiteParameters, base_key: bytes) -> bytes:
    """finished_key (RFC 8446 section 4.4.4)."""
    return hkdf_expand_label(suite, base_key, b"finished", b"", suite.hash_length)


def finished_verify_data(
    suite: SuiteParameters, base_key: bytes, transcript_hash: bytes
) -> bytes:
    """Finished.verify_data = HMAC(finished_key, Transcript-Hash(...))."""
    return hmac.new(
        finished_key(suite, base_key), transcript_hash, suite.hash_name
    ).digest()


def next_traffic_secret(suite: SuiteParameters, secret: bytes) -> bytes:
    """application_traffic_secret_N+1 for KeyUpdate (RFC 8446 section 7.2)."""
    return hkdf_expand_label(suite, secret, b"traffic upd", b"", suite.hash_length)


class Transcript:
    """The running handshake transcript (RFC 8446 section 4.4.1).

    Messages before ServerHello are kept as bytes because the hash is unknown
    until the server picks a cipher suite; `select_suite` starts the hash.
    """

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._hash: hashes.Hash | None = None

    def select_suite(self, suite: SuiteParameters) -> None:
        self._hash = hashes.Hash(suite.hash_factory())
        for message in self._pending:
            self._hash.update(message)
        self._pending.clear()

    def add(self, message: bytes) -> None:
        if self._hash is None:
            self._pending.append(message)
        else:
            self._hash.update(message)

    def replace_with_message_hash(self, suite: SuiteParameters) -> None:
        """Replace ClientHello1 with message_hash after a HelloRetryRequest.

        RFC 8446 section 4.4.1: the transcript continues from
        `message_hash (254) || 00 00 Hash.length || Hash(ClientHello1)`.
        """
        if len(self._pending) != 1 or self._hash is not None:
            raise RuntimeError("message_hash applies to ClientHello1 alone")
        client_hello_hash = transcript_digest(suite, self._pending[0])
        self._pending = [
            bytes([254, 0, 0, suite.hash_length]) + client_hello_hash,
        ]

    def digest(self) -> bytes:
        if self._hash is None:
            raise RuntimeError("transcript hash needs the cipher suite first")
        return self._hash.copy().finalize()

    def digest_with(self, suite: SuiteParameters, data: bytes) -> bytes:
        """Hash the transcript so far plus `data`, leaving the transcript as it
        is. Before a suite is selected, `suite` picks the hash; a PSK binder
        needs this because it is computed before the server chooses."""
        if self._hash is None:
            digest = hashes.Hash(suite.hash_factory())
            for message in self._pending:
                digest.update(message)
        else:
            digest = self._hash.copy()
        digest.update(data)
        return digest.finalize()

    def copy(self) -> Transcript:
        """Return an independent transcript with the same messages so far."""
        clone = Transcript()
        clone._pending = list(self._pending)
        clone._hash = None if self._hash is None else self._hash.copy()
        return clone


def resumption_psk(
    suite: SuiteParameters, resumption_master_secret: bytes, ticket_nonce: bytes
) -> bytes:
    """The PSK of one NewSessionTicket (RFC 8446 section 4.6.1)."""
    return hkdf_expand_label(
        suite,
        resumption_master_secret,
        b"resumption",
        ticket_nonce,
        suite.hash_length,
    )


class KeySchedule:
    """The secrets of RFC 8446 section 7.1 for an (EC)DHE handshake, with a
    resumption PSK (psk_dhe_ke) or without one (the PSK is then zeros)."""

    def __init__(self, suite: SuiteParameters, psk: bytes | None = None) -> None:
        self.suite = suite
        zeros = bytes(suite.hash_length)
        self.early_secret = hkdf_extract(suite, zeros, zeros if psk is None else psk)
        self.handshake_secret = b""
        self.master_secret = b""

    def _derived(self, secret: bytes) -> bytes:
        empty_hash = transcript_digest(self.suite, b"")
        return derive_secret(self.suite, secret, b"derived", empty_hash)

    def set_shared_secret(self, shared_secret: bytes) -> None:
        """Enter the Handshake Secret, then the Master Secret."""
        self.handshake_secret = hkdf_extract(
            self.suite, self._derived(self.early_secret), shared_secret
        )
        self.master_secret = hkdf_extract(
            self.suite,
            self._derived(self.handshake_secret),
            bytes(self.suite.hash_length),
        )

    def binder_key(self) -> bytes:
        """The resumption binder_key ("res binder", RFC 8446 section 7.1)."""
        empty_hash = transcript_digest(self.suite, b"")
        return derive_secret(self.suite, self.early_secret, b"res binder", empty_hash)

    def binder(self, truncated_hello_hash: bytes) -> bytes:
        """A PSK binder: a Finished MAC under binder_key over the transcript
        through the truncated ClientHello (RFC 8446 section 4.2.11.2)."""
        return finished_verify_data(self.suite, self.binder_key(), truncated_hello_hash)

    def resumption_master_secret(self, transcript_hash: bytes) -> bytes:
        """resumption_master_secret over ClientHello..client Finished."""
        return derive_secret(
            self.suite, self.master_secret, b"res master", transcript_hash
        )

    def handshake_traffic_secrets(self, transcript_hash: bytes) -> tuple[bytes, bytes]:
        """(client, server) handshake traffic secrets over ClientHello..ServerHello."""
        return (
            derive_secret(
                self.suite, self.handshake_secret, b"c hs traffic", transcript_hash
            ),
            derive_secret(
                self.suite, self.handshake_secret, b"s hs traffic", transcript_hash
            ),
        )

    def application_traffic_secrets(
        self, transcript_hash: bytes
    ) -> tuple[bytes, bytes]:
        """(client, server) application traffic secrets over ClientHello..server
        Finished."""
        return (
            derive_secret(
                self.suite, self.master_secret, b"c ap traffic", transcript_hash
            ),
            derive_secret(
                self.suite, self.master_secret, b"s ap traffic", transcript_hash
            ),
        )
