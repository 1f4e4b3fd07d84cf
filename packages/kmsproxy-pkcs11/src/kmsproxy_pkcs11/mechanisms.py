"""The choice of PKCS#11 mechanism for each TLS SignatureScheme of a key.

A token reports its mechanisms (`C_GetMechanismList`), and a key may narrow
them (`CKA_ALLOWED_MECHANISMS`). For each scheme the key type allows, the
combined mechanism that hashes on the token is preferred (CKM_ECDSA_SHA256,
CKM_SHA256_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS). When it is missing, the
message is hashed in software and the raw mechanism signs the digest
(CKM_ECDSA, CKM_RSA_PKCS_PSS, or CKM_RSA_PKCS over a DigestInfo). A scheme
with neither is left out, so the TLS client never offers what the token
cannot do: an RSA key limited to CKM_RSA_PKCS falls back to TLS 1.2.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import MGF, Mechanism

from kmsproxy.signer import PublicKey, SignatureScheme, schemes_for_public_key


@dataclass(frozen=True)
class HashMechanisms:
    """The PKCS#11 names that go with one SHA-2 digest."""

    digest: Mechanism
    mgf1: MGF
    ecdsa: Mechanism
    rsa_pss: Mechanism
    rsa_pkcs1: Mechanism
    # The DER DigestInfo prefix that CKM_RSA_PKCS needs before a bare
    # digest (RFC 8017 section 9.2, note 1).
    digest_info: bytes


# Keyed by `cryptography`'s hash name, as `SignatureScheme.hash_algorithm`
# reports it.
HASH_MECHANISMS: dict[str, HashMechanisms] = {
    "sha256": HashMechanisms(
        Mechanism.SHA256,
        MGF.SHA256,
        Mechanism.ECDSA_SHA256,
        Mechanism.SHA256_RSA_PKCS_PSS,
        Mechanism.SHA256_RSA_PKCS,
        bytes.fromhex("3031300d060960864801650304020105000420"),
    ),
    "sha384": HashMechanisms(
        Mechanism.SHA384,
        MGF.SHA384,
        Mechanism.ECDSA_SHA384,
        Mechanism.SHA384_RSA_PKCS_PSS,
        Mechanism.SHA384_RSA_PKCS,
        bytes.fromhex("3041300d060960864801650304020205000430"),
    ),
    "sha512": HashMechanisms(
        Mechanism.SHA512,
        MGF.SHA512,
        Mechanism.ECDSA_SHA512,
        Mechanism.SHA512_RSA_PKCS_PSS,
        Mechanism.SHA512_RSA_PKCS,
        bytes.fromhex("3051300d060960864801650304020305000440"),
    ),
}

# The mechanisms this backend can use at all, for `kmsproxy pkcs11 list`.
SIGNING_MECHANISMS: frozenset[Mechanism] = frozenset(
    {
        Mechanism.ECDSA,
        Mechanism.RSA_PKCS,
        Mechanism.RSA_PKCS_PSS,
        *(names.ecdsa for names in HASH_MECHANISMS.values()),
        *(names.rsa_pss for names in HASH_MECHANISMS.values()),
        *(names.rsa_pkcs1 for names in HASH_MECHANISMS.values()),
    }
)


@dataclass(frozen=True)
class SigningPlan:
    """How to produce one scheme's signature with one mechanism.

    `prehash` means the message is hashed in software first;
    `digest_info` means the digest is wrapped in a DigestInfo for
    CKM_RSA_PKCS; `der_ecdsa` means the token's raw r||s is re-encoded as
    DER for TLS.
    """

    scheme: SignatureScheme
    mechanism: Mechanism
    parameter: tuple[Mechanism, MGF, int] | None = None
    prehash: bool = False
    digest_info: bool = False
    der_ecdsa: bool = False

    def prepare(self, data: bytes) -> bytes:
        """Return the bytes to pass to C_Sign for message `data`."""
        if not self.prehash:
            return data
        algorithm = self.scheme.hash_algorithm
        if algorithm is None:
            raise ValueError(f"{self.scheme.name} has no digest to compute")
        digester = hashes.Hash(algorithm)
        digester.update(data)
        digest = digester.finalize()
        if self.digest_info:
            return HASH_MECHANISMS[algorithm.name].digest_info + digest
        return digest

    def finish(self, signature: bytes) -> bytes:
        """Return the token's signature in TLS wire form."""
        if not self.der_ecdsa:
            return signature
        if not signature or len(signature) % 2:
            raise ValueError(f"ECDSA signature of {len(signature)} bytes is not r||s")
        half = len(signature) // 2
        r = int.from_bytes(signature[:half], "big")
        s = int.from_bytes(signature[half:], "big")
        return encode_dss_signature(r, s)


def plan_signing(
    public_key: PublicKey,
    available: Collection[Mechanism],
    allowed: Collection[Mechanism] | None,
) -> list[SigningPlan]:
    """Return a plan for each scheme this key can sign on this token.

    `available` is the token's mechanism list (signing ones); `allowed` is
    the key's CKA_ALLOWED_MECHANISMS, or None where the key sets none. The
    order follows `schemes_for_public_key`, most preferred first.
    """
    usable = set(available)
    if allowed:
        usable &= set(allowed)
    plans = []
    for scheme in schemes_for_public_key(public_key):
        plan = _plan_for(public_key, scheme, usable)
        if plan is not None:
            plans.append(plan)
    return plans


def _plan_for(
    public_key: PublicKey, scheme: SignatureScheme, usable: set[Mechanism]
) -> SigningPlan | None:
    algorithm = scheme.hash_algorithm
    names = HASH_MECHANISMS.get(algorithm.name) if algorithm is not None else None
    if algorithm is None or names is None:
        return None
    if isinstance(public_key, ec.EllipticCurvePublicKey) and scheme.is_ecdsa:
        return _first(
            usable,
            SigningPlan(scheme, names.ecdsa, der_ecdsa=True),
            SigningPlan(scheme, Mechanism.ECDSA, prehash=True, der_ecdsa=True),
        )
    if isinstance(public_key, rsa.RSAPublicKey) and scheme.is_rsa_pss:
        # TLS fixes the salt length to the digest length (RFC 8446 4.2.3).
        parameter = (names.digest, names.mgf1, algorithm.digest_size)
        return _first(
            usable,
            SigningPlan(scheme, names.rsa_pss, parameter),
            SigningPlan(scheme, Mechanism.RSA_PKCS_PSS, parameter, prehash=True),
        )
    if isinstance(public_key, rsa.RSAPublicKey) and scheme.is_rsa_pkcs1:
        return _first(
            usable,
            SigningPlan(scheme, names.rsa_pkcs1),
            SigningPlan(scheme, Mechanism.RSA_PKCS, prehash=True, digest_info=True),
        )
    return None


def _first(usable: set[Mechanism], *plans: SigningPlan) -> SigningPlan | None:
    for plan in plans:
        if plan.mechanism in usable:
            return plan
    return None


def fits_key_size(
    mechanism: Mechanism,
    minimum: int | None,
    maximum: int | None,
    public_key: PublicKey,
) -> bool:
    """Return False when an RSA mechanism's key size range excludes the key.

    `minimum` and `maximum` are C_GetMechanismInfo's ulMinKeySize and
    ulMaxKeySize, the modulus size in bits for RSA mechanisms (SoftHSM2 2.6
    reports 512 to 16384). A token whose PSS stops at 2048 bits would
    otherwise be offered PSS for an RSA-3072 key and fail in the middle of a
    handshake. EC mechanisms are not checked.
    """
    if not isinstance(public_key, rsa.RSAPublicKey) or "RSA" not in mechanism.name:
        return True
    size = public_key.key_size
    if minimum and size < minimum:
        return False
    return not (maximum and size > maximum)


def mechanism_names(mechanisms: Iterable[Mechanism | int]) -> list[str]:
    """Return PKCS#11 names (`CKM_ECDSA`) for mechanisms, sorted."""
    names = []
    for mechanism in mechanisms:
        if isinstance(mechanism, Mechanism):
            names.append(f"CKM_{mechanism.name}")
        else:
            names.append(f"0x{mechanism:08X}")
    return sorted(names)
