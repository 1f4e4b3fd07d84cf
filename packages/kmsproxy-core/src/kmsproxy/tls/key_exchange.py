"""(EC)DHE key shares for the groups this client supports (RFC 8446 4.2.8)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from .alerts import IllegalParameter
from .messages import NamedGroup

KeySharePrivateKey = x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey

_CURVES: dict[NamedGroup, ec.EllipticCurve] = {
    NamedGroup.secp256r1: ec.SECP256R1(),
    NamedGroup.secp384r1: ec.SECP384R1(),
}

# Length of an UncompressedPointRepresentation (0x04 || X || Y), the only
# encoding TLS 1.3 allows for ECDHE shares (RFC 8446 section 4.2.8.2).
_UNCOMPRESSED_POINT_LENGTHS = {NamedGroup.secp256r1: 65, NamedGroup.secp384r1: 97}


def generate_private_key(group: NamedGroup) -> KeySharePrivateKey:
    if group == NamedGroup.x25519:
        return x25519.X25519PrivateKey.generate()
    return ec.generate_private_key(_CURVES[group])


def public_key_bytes(private_key: KeySharePrivateKey) -> bytes:
    """Encode our share's key_exchange field."""
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
    """Compute the (EC)DHE shared secret.

    Raise `IllegalParameter` for an invalid peer share: a wrong length, a
    point not on the curve, or an x25519 result of all zeros, which RFC 8446
    section 7.4.2 requires a client to reject.
    """
    try:
        if isinstance(private_key, x25519.X25519PrivateKey):
            if len(peer_share) != 32:
                raise ValueError(f"x25519 share of {len(peer_share)} bytes")
            peer = x25519.X25519PublicKey.from_public_bytes(peer_share)
            secret = private_key.exchange(peer)
            if not any(secret):
                raise ValueError("x25519 shared secret is all zeros")
            return secret
        expected = _UNCOMPRESSED_POINT_LENGTHS[group]
        if len(peer_share) != expected or peer_share[0] != 0x04:
            raise ValueError(
                f"{group.name} share is not a {expected}-byte uncompressed point"
            )
        point = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[group], peer_share)
        return private_key.exchange(ec.ECDH(), point)
    except ValueError as error:
        raise IllegalParameter(f"invalid server key share: {error}") from None
