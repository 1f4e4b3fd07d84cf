"""Key shares for the groups this client supports: (EC)DHE (RFC 8446
section 4.2.8) and the X25519MLKEM768 hybrid (draft-ietf-tls-ecdhe-mlkem)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519

from .alerts import IllegalParameter
from .messages import NamedGroup

# X25519MLKEM768 sizes in bytes (draft-ietf-tls-ecdhe-mlkem section 4.1 and
# FIPS 203 table 3). The ML-KEM part comes first in every field.
MLKEM768_ENCAPSULATION_KEY_LENGTH = 1184
MLKEM768_CIPHERTEXT_LENGTH = 1088
X25519_KEY_LENGTH = 32


@dataclass(frozen=True)
class HybridPrivateKey:
    """Our X25519MLKEM768 share: an ML-KEM-768 decapsulation key and an
    X25519 key, generated independently."""

    mlkem: mlkem.MLKEM768PrivateKey
    x25519: x25519.X25519PrivateKey


KeySharePrivateKey = (
    x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey | HybridPrivateKey
)

_CURVES: dict[NamedGroup, ec.EllipticCurve] = {
    NamedGroup.secp256r1: ec.SECP256R1(),
    NamedGroup.secp384r1: ec.SECP384R1(),
    NamedGroup.secp521r1: ec.SECP521R1(),
}

# Length of an UncompressedPointRepresentation (0x04 || X || Y), the only
# encoding TLS 1.3 allows for ECDHE shares (RFC 8446 section 4.2.8.2).
_UNCOMPRESSED_POINT_LENGTHS = {
    NamedGroup.secp256r1: 65,
    NamedGroup.secp384r1: 97,
    NamedGroup.secp521r1: 133,
}


def generate_private_key(group: NamedGroup) -> KeySharePrivateKey:
    if group == NamedGroup.X25519MLKEM768:
        return HybridPrivateKey(
            mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        )
    if group == NamedGroup.x25519:
        return x25519.X25519PrivateKey.generate()
    return ec.generate_private_key(_CURVES[group])


def public_key_bytes(private_key: KeySharePrivateKey) -> bytes:
    """Encode our share's key_exchange field."""
    if isinstance(private_key, HybridPrivateKey):
        # The ML-KEM encapsulation key, then the X25519 public key.
        return private_key.mlkem.public_key().public_bytes_raw() + public_key_bytes(
            private_key.x25519
        )
    if isinstance(private_key, x25519.X25519PrivateKey):
        return private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def shared_secret(
    group: NamedGroup, private_key: KeySharePrivateKey, peer_share: bytes
) -> bytes:
    """Compute the shared secret for the server's share.

    Raise `IllegalParameter` for an invalid peer share: a wrong length, a
    point not on the curve, or an x25519 result of all zeros, which RFC 8446
    section 7.4.2 requires a client to reject. ML-KEM decapsulation of a
    corrupted ciphertext succeeds with an unrelated secret (implicit
    rejection, FIPS 203), so that failure shows later as a bad Finished.
    """
    try:
        if isinstance(private_key, HybridPrivateKey):
            return _hybrid_shared_secret(private_key, peer_share)
        if isinstance(private_key, x25519.X25519PrivateKey):
            return _x25519_shared_secret(private_key, peer_share)
        expected = _UNCOMPRESSED_POINT_LENGTHS[group]
        if len(peer_share) != expected or peer_share[0] != 0x04:
            raise ValueError(
                f"{group.name} share is not a {expected}-byte uncompressed point"
            )
        point = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[group], peer_share)
        return private_key.exchange(ec.ECDH(), point)
    except ValueError as error:
        raise IllegalParameter(f"invalid server key share: {error}") from None


def _x25519_shared_secret(
    private_key: x25519.X25519PrivateKey, peer_share: bytes
) -> bytes:
    if len(peer_share) != X25519_KEY_LENGTH:
        raise ValueError(f"x25519 share of {len(peer_share)} bytes")
    peer = x25519.X25519PublicKey.from_public_bytes(peer_share)
    secret = private_key.exchange(peer)
    if not any(secret):
        raise ValueError("x25519 shared secret is all zeros")
    return secret


def _hybrid_shared_secret(private_key: HybridPrivateKey, peer_share: bytes) -> bytes:
    """Decapsulate and exchange; return the ML-KEM shared secret followed by
    the X25519 one (32 + 32 bytes)."""
    expected = MLKEM768_CIPHERTEXT_LENGTH + X25519_KEY_LENGTH
    if len(peer_share) != expected:
        raise ValueError(
            f"X25519MLKEM768 share of {len(peer_share)} bytes, expected {expected}"
        )
    ciphertext = peer_share[:MLKEM768_CIPHERTEXT_LENGTH]
    mlkem_secret = private_key.mlkem.decapsulate(ciphertext)
    x25519_secret = _x25519_shared_secret(
        private_key.x25519, peer_share[MLKEM768_CIPHERTEXT_LENGTH:]
    )
    return mlkem_secret + x25519_secret
