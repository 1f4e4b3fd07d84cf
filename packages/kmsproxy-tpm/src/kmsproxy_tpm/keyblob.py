"""TSS2 PRIVATE KEY files and the TLS schemes a TPM key can sign with.

The file format is the one tpm2-openssl, the tpm2-tss engine and
`tpm2_encodeobject` write: an ASN.1 `TPMKey` (OID 2.23.133.10.1.3) holding
the key's TPM2B_PUBLIC and its TPM2B_PRIVATE wrapped by a parent. Parent
0x40000001 (the owner hierarchy) means the primary key made from the
standard storage key template: ECC P-256 when the TPM has ECC, else RSA
2048. A persistent handle such as 0x81000001 names the parent key itself.
tpm2-pytss's `TSSPrivKey` reads, writes, creates and loads these files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_CAP, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPMS_SCHEME_HASH, TPMT_SIG_SCHEME, TPMU_SIG_SCHEME

from kmsproxy import files
from kmsproxy.signer import PublicKey, SignatureScheme

PEM_LABEL = b"-----BEGIN TSS2 PRIVATE KEY-----"

# TPM2_GetCapability(TPM_CAP_ALGS) page size: the TPM returns at most this
# many entries per call, and a TPM 2.0 implements well under 100 algorithms.
MAX_ALGORITHMS_PER_CALL = 128

# Bound on capability pages read, so a TPM that keeps saying "more" cannot
# loop forever; 8 pages of 128 are far more than any TPM lists.
MAX_CAPABILITY_PAGES = 8

_CURVES: dict[int, str] = {
    int(TPM2_ECC.NIST_P256): "P-256",
    int(TPM2_ECC.NIST_P384): "P-384",
}

CURVE_IDS: dict[str, int] = {name: curve for curve, name in _CURVES.items()}

_TPM_HASHES: dict[str, int] = {
    "sha256": int(TPM2_ALG.SHA256),
    "sha384": int(TPM2_ALG.SHA384),
    "sha512": int(TPM2_ALG.SHA512),
}

_HASHLIB: dict[int, Any] = {
    int(TPM2_ALG.SHA256): hashlib.sha256,
    int(TPM2_ALG.SHA384): hashlib.sha384,
    int(TPM2_ALG.SHA512): hashlib.sha512,
}

# Schemes in the order a key offers them; ECDSA keys get their curve's one.
_ECDSA_SCHEMES: dict[str, SignatureScheme] = {
    "P-256": SignatureScheme.ecdsa_secp256r1_sha256,
    "P-384": SignatureScheme.ecdsa_secp384r1_sha384,
}
_RSA_PSS_SCHEMES = (
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
)
_RSA_PKCS1_SCHEMES = (
    SignatureScheme.rsa_pkcs1_sha256,
    SignatureScheme.rsa_pkcs1_sha384,
    SignatureScheme.rsa_pkcs1_sha512,
)


class KeyFileError(Exception):
    """A key file is missing or is not a usable TSS2 PRIVATE KEY."""


@dataclass(frozen=True)
class KeyBlob:
    """A TSS2 PRIVATE KEY file's content, with its public key and key type."""

    key: Any  # tpm2_pytss.tsskey.TSSPrivKey
    public_key: PublicKey
    description: str

    @property
    def public_area(self) -> Any:
        return self.key.public.publicArea

    @property
    def needs_auth(self) -> bool:
        return not bool(self.key.empty_auth)

    def to_pem(self) -> bytes:
        pem: bytes = self.key.to_pem()
        return pem


def read_key_file(path: Path) -> KeyBlob:
    """Read a TSS2 PRIVATE KEY PEM; raise `KeyFileError` naming the file."""
    try:
        # Bounded and non-blocking, because a reload re-reads the file and a
        # FIFO or /dev/zero at its path must not hang the reload.
        data = files.read_key_file(path)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found") from None
    except OSError as error:
        raise KeyFileError(f"cannot read {path}: {error.strerror}") from None
    if PEM_LABEL not in data:
        raise KeyFileError(
            f"{path} is not a TSS2 PRIVATE KEY PEM file; use a file written by "
            "`kmsproxy tpm create`, tpm2-openssl or `tpm2_encodeobject`"
        )
    try:
        key = TSSPrivKey.from_pem(data)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"{path}: invalid TSS2 PRIVATE KEY: {error}") from None
    return blob_from_key(key, str(path))


def blob_from_key(key: Any, source: str) -> KeyBlob:
    """Wrap a `TSSPrivKey`; raise `KeyFileError` for a key that cannot sign TLS."""
    area = key.public.publicArea
    attributes = int(area.objectAttributes)
    if not attributes & int(TPMA_OBJECT.SIGN_ENCRYPT):
        raise KeyFileError(
            f"{source}: the key is not a signing key (no sign attribute)"
        )
    if attributes & int(TPMA_OBJECT.RESTRICTED):
        raise KeyFileError(
            f"{source}: the key is a restricted signing key, which signs only "
            "digests the TPM computed itself; create an unrestricted key"
        )
    public_key = serialization.load_pem_public_key(key.public.to_pem())
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = _CURVES.get(int(area.parameters.eccDetail.curveID))
        if curve is None:
            raise KeyFileError(
                f"{source}: curve {public_key.curve.name} is not supported; "
                "use P-256 or P-384"
            )
        return KeyBlob(key, public_key, f"EC {curve}")
    if isinstance(public_key, rsa.RSAPublicKey):
        return KeyBlob(key, public_key, f"RSA {public_key.key_size}")
    raise KeyFileError(f"{source}: {type(public_key).__name__} keys cannot sign TLS")


def supported_algorithms(esapi: Any) -> frozenset[int]:
    """Ask the TPM which algorithms it implements (TPM2_GetCapability ALGS)."""
    algorithms: set[int] = set()
    first = 0
    for _ in range(MAX_CAPABILITY_PAGES):
        more, data = esapi.get_capability(TPM2_CAP.ALGS, first, MAX_ALGORITHMS_PER_CALL)
        listed = data.data.algorithms
        for index in range(listed.count):
            algorithms.add(int(listed.algProperties[index].alg))
        if not more or listed.count == 0:
            break
        first = max(algorithms) + 1
    return frozenset(algorithms)


def candidate_schemes(
    blob: KeyBlob, algorithms: frozenset[int]
) -> list[SignatureScheme]:
    """List the TLS schemes the key's template and the TPM allow.

    A key whose template fixes a scheme (for example `tpm2_create -G
    rsa2048:rsassa-sha256`) signs only with that scheme and hash. A key with
    the NULL scheme takes the scheme from each TPM2_Sign. The signer still
    checks a real signature with each scheme before it offers the scheme.
    """
    area = blob.public_area
    if isinstance(blob.public_key, ec.EllipticCurvePublicKey):
        fixed = area.parameters.eccDetail.scheme
        candidates = [_ECDSA_SCHEMES[blob.description.removeprefix("EC ")]]
        required = int(TPM2_ALG.ECDSA)
    else:
        fixed = area.parameters.rsaDetail.scheme
        candidates = [
            *(s for s in _RSA_PSS_SCHEMES if int(TPM2_ALG.RSAPSS) in algorithms),
            *(s for s in _RSA_PKCS1_SCHEMES if int(TPM2_ALG.RSASSA) in algorithms),
        ]
        required = 0
    if required and required not in algorithms:
        return []
    candidates = [s for s in candidates if tpm_hash(s) in algorithms]
    fixed_scheme = int(fixed.scheme)
    if fixed_scheme == int(TPM2_ALG.NULL):
        return candidates
    fixed_hash = int(fixed.details.anySig.hashAlg)
    return [
        s
        for s in candidates
        if tpm_signature_algorithm(s) == fixed_scheme and tpm_hash(s) == fixed_hash
    ]


def fixed_scheme_name(blob: KeyBlob) -> str | None:
    """Name the scheme and hash the key's template fixes, if no TLS scheme fits.

    Return None for a template with the NULL scheme or with a scheme that
    some TLS signature scheme uses.
    """
    area = blob.public_area
    if isinstance(blob.public_key, ec.EllipticCurvePublicKey):
        fixed = area.parameters.eccDetail.scheme
        tls_schemes = [_ECDSA_SCHEMES[blob.description.removeprefix("EC ")]]
    else:
        fixed = area.parameters.rsaDetail.scheme
        tls_schemes = [*_RSA_PSS_SCHEMES, *_RSA_PKCS1_SCHEMES]
    scheme = int(fixed.scheme)
    if scheme == int(TPM2_ALG.NULL):
        return None
    hash_algorithm = int(fixed.details.anySig.hashAlg)
    for tls_scheme in tls_schemes:
        if (
            tpm_signature_algorithm(tls_scheme) == scheme
            and tpm_hash(tls_scheme) == hash_algorithm
        ):
            return None
    return f"{TPM2_ALG(scheme)} with {TPM2_ALG(hash_algorithm)}"


def tpm_hash(scheme: SignatureScheme) -> int:
    algorithm = scheme.hash_algorithm
    if algorithm is None or algorithm.name not in _TPM_HASHES:
        raise ValueError(f"{scheme.name} has no TPM hash algorithm")
    return _TPM_HASHES[algorithm.name]


def tpm_signature_algorithm(scheme: SignatureScheme) -> int:
    if scheme.is_ecdsa:
        return int(TPM2_ALG.ECDSA)
    if scheme.is_rsa_pss:
        return int(TPM2_ALG.RSAPSS)
    if scheme.is_rsa_pkcs1:
        return int(TPM2_ALG.RSASSA)
    raise ValueError(f"{scheme.name} has no TPM signature algorithm")


def digest_for(scheme: SignatureScheme, data: bytes) -> bytes:
    """Hash `data` in software with the scheme's hash, as TPM2_Sign expects."""
    digest: bytes = _HASHLIB[tpm_hash(scheme)](data).digest()
    return digest


def sign_digest(
    esapi: Any, handle: Any, scheme: SignatureScheme, digest: bytes
) -> bytes:
    """Run TPM2_Sign with a NULL hash check ticket; return the TLS wire form.

    A NULL ticket is accepted for keys without the restricted attribute
    (TPM 2.0 Part 3, TPM2_Sign), which `blob_from_key` requires.
    """
    algorithm = tpm_signature_algorithm(scheme)
    sig_scheme = TPMT_SIG_SCHEME(
        scheme=algorithm,
        details=TPMU_SIG_SCHEME(any=TPMS_SCHEME_HASH(hashAlg=tpm_hash(scheme))),
    )
    signature = esapi.sign(handle, digest, sig_scheme)
    if algorithm == int(TPM2_ALG.ECDSA):
        r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
        return encode_dss_signature(r, s)
    if algorithm == int(TPM2_ALG.RSAPSS):
        return bytes(signature.signature.rsapss.sig)
    return bytes(signature.signature.rsassa.sig)
