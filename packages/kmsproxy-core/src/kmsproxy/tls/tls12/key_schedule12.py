"""TLS 1.2 cipher suites and key derivation (RFC 5246 sections 5, 6.3, 8).

The PRF, the extended master secret (RFC 7627 section 4), the key block and
Finished.verify_data. Only AEAD suites with ECDHE exist here, so the key
block carries no MAC keys and the PRF hash is the suite's hash.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..key_schedule import AEAD, SuiteParameters


class CipherSuite12(enum.IntEnum):
    """The TLS 1.2 suites this client offers (RFC 5289, RFC 7905)."""

    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 = 0xC02B
    TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 = 0xC02F
    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 = 0xC02C
    TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 = 0xC030
    TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 = 0xCCA9
    TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 = 0xCCA8


class Authentication(enum.Enum):
    """The server key type a suite requires (RFC 8422 section 2)."""

    ECDSA = "ECDSA"
    RSA = "RSA"


# Bytes of the master secret (RFC 5246 section 8.1).
MASTER_SECRET_LENGTH = 48

# Bytes of Finished.verify_data for every suite here (RFC 5246 7.4.9).
VERIFY_DATA_LENGTH = 12

# AES-GCM: a 4-byte implicit salt from the key block and an 8-byte explicit
# nonce in each record (RFC 5288 section 3). ChaCha20-Poly1305: a 12-byte
# IV from the key block and no explicit nonce (RFC 7905 section 2).
GCM_FIXED_IV_LENGTH = 4
GCM_EXPLICIT_NONCE_LENGTH = 8
CHACHA20_IV_LENGTH = 12


@dataclass(frozen=True)
class Suite12:
    """The PRF hash, AEAD, key and IV sizes a TLS 1.2 suite fixes."""

    code: CipherSuite12
    authentication: Authentication
    hash_factory: Callable[[], hashes.HashAlgorithm]
    hash_name: str
    key_length: int
    fixed_iv_length: int
    explicit_nonce_length: int
    aead_factory: Callable[[bytes], AEAD]

    @property
    def transcript_parameters(self) -> SuiteParameters:
        """The suite as `Transcript` needs it (only the hash is used)."""
        return SuiteParameters(
            self.hash_factory, self.hash_name, self.key_length, self.aead_factory
        )


def _suite(
    code: CipherSuite12, hash_factory: Callable[[], hashes.HashAlgorithm]
) -> Suite12:
    authentication = (
        Authentication.ECDSA if "_ECDSA_" in code.name else Authentication.RSA
    )
    hash_name = hash_factory().name
    if "CHACHA20" in code.name:
        return Suite12(
            code,
            authentication,
            hash_factory,
            hash_name,
            32,
            CHACHA20_IV_LENGTH,
            0,
            ChaCha20Poly1305,
        )
    key_length = 16 if "AES_128" in code.name else 32
    return Suite12(
        code,
        authentication,
        hash_factory,
        hash_name,
        key_length,
        GCM_FIXED_IV_LENGTH,
        GCM_EXPLICIT_NONCE_LENGTH,
        AESGCM,
    )


_C = CipherSuite12
SUITES12: dict[int, Suite12] = {
    code: _suite(code, hashes.SHA384 if code.name.endswith("SHA384") else hashes.SHA256)
    for code in _C
}

# Our preference order: ECDSA before RSA (smaller, faster handshakes), then
# AES-GCM (hardware support on common CPUs) before ChaCha20-Poly1305.
CIPHER_SUITES12 = (
    _C.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    _C.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    _C.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    _C.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    _C.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    _C.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
)


def p_hash(hash_name: str, secret: bytes, seed: bytes, length: int) -> bytes:
    """P_hash (RFC 5246 section 5): HMAC chained over A(i) until `length`."""
    output = b""
    a = seed
    while len(output) < length:
        a = hmac.new(secret, a, hash_name).digest()
        output += hmac.new(secret, a + seed, hash_name).digest()
    return output[:length]


def prf(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """PRF(secret, label, seed) = P_hash(secret, label + seed) (section 5)."""
    return p_hash(hash_name, secret, label + seed, length)


def extended_master_secret(
    suite: Suite12, pre_master_secret: bytes, session_hash: bytes
) -> bytes:
    """master_secret from the hash of ClientHello..ClientKeyExchange
    (RFC 7627 section 4), which binds it to this handshake's messages."""
    return prf(
        suite.hash_name,
        pre_master_secret,
        b"extended master secret",
        session_hash,
        MASTER_SECRET_LENGTH,
    )


@dataclass(frozen=True)
class KeyBlock:
    """The write keys and IVs of both sides (RFC 5246 section 6.3)."""

    client_key: bytes
    server_key: bytes
    client_iv: bytes
    server_iv: bytes


def key_block(
    suite: Suite12, master_secret: bytes, client_random: bytes, server_random: bytes
) -> KeyBlock:
    """Split the key block; AEAD suites have no MAC keys (RFC 5288, 7905)."""
    key, iv = suite.key_length, suite.fixed_iv_length
    block = prf(
        suite.hash_name,
        master_secret,
        b"key expansion",
        server_random + client_random,
        2 * key + 2 * iv,
    )
    return KeyBlock(
        client_key=block[:key],
        server_key=block[key : 2 * key],
        client_iv=block[2 * key : 2 * key + iv],
        server_iv=block[2 * key + iv :],
    )


def finished_verify_data(
    suite: Suite12, master_secret: bytes, label: bytes, handshake_hash: bytes
) -> bytes:
    """Finished.verify_data (RFC 5246 section 7.4.9); `label` is
    b"client finished" or b"server finished"."""
    return prf(
        suite.hash_name, master_secret, label, handshake_hash, VERIFY_DATA_LENGTH
    )
