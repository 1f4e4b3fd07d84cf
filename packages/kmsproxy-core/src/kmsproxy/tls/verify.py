"""Server authentication: the trust store, chain and name checks, and the
server's CertificateVerify signature (RFC 8446 sections 4.4.2 and 4.4.3).

Chain building and name matching are delegated to
`cryptography.x509.verification`, which applies RFC 5280 and RFC 6125 rules
to SANs only, with no Common Name fallback. This module maps its failures to
alerts with a reason a user can act on.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
import ssl
import warnings
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import PublicKeyAlgorithmOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ..certificates import CertificateError
from ..signer import PublicKey, SignatureScheme, verify_signature
from .alerts import (
    AlertDescription,
    BadCertificate,
    CertificateVerifyFailed,
    DecryptError,
    IllegalParameter,
    UnsupportedCertificate,
)

logger = logging.getLogger(__name__)

# File names OpenSSL's c_rehash gives CA certificates in a capath directory.
_HASHED_NAME = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")

_PEM_CERTIFICATE_MARKER = b"-----BEGIN CERTIFICATE-----"
_PEM_CERTIFICATE_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)

# The reason cryptography 50 gives when no chain reaches a trusted CA and
# no candidate failed for another reason, which means the issuer is unknown.
_NO_INTERIOR_ERRORS = "all candidates exhausted with no interior errors"

# Reprs in cryptography's VerificationError text: a trailing
# "(encountered processing <Certificate(...)>)" and a Rust debug dump of an
# AlgorithmIdentifier whose last field names the algorithm.
_ENCOUNTERED_TAIL = re.compile(r"\s*\(encountered processing <Certificate\(.*\)>\)\s*$")
_ALGORITHM_IDENTIFIER = re.compile(r"AlgorithmIdentifier \{.*?params: (\w+).*?\}")

# cryptography 50's reason for a certificate without an extension that the
# RFC 5280 and CA/Browser Forum profile requires, and the subject in the
# "encountered processing" tail, when the message has one.
_MISSING_EXTENSION = re.compile(
    r"invalid extension: ([\d.]+): Certificate is missing required extension"
)
_ENCOUNTERED_SUBJECT = re.compile(
    r"encountered processing <Certificate\(subject=<Name\((.*?)\)>"
)

# Names of the extensions that the profile requires, by OID (RFC 5280
# section 4.2.1).
_EXTENSION_NAMES = {
    "2.5.29.14": "subjectKeyIdentifier",
    "2.5.29.15": "keyUsage",
    "2.5.29.17": "subjectAltName",
    "2.5.29.19": "basicConstraints",
    "2.5.29.35": "authorityKeyIdentifier",
    "2.5.29.37": "extKeyUsage",
}

# The context strings of RFC 8446 section 4.4.3, each preceded by 64 spaces
# and followed by one zero byte.
SERVER_CONTEXT = b"TLS 1.3, server CertificateVerify"
CLIENT_CONTEXT = b"TLS 1.3, client CertificateVerify"

# The ECDSA curve each TLS 1.3 ECDSA scheme requires (RFC 8446 section 4.2.3).
_ECDSA_SCHEME_CURVES: dict[SignatureScheme, str] = {
    SignatureScheme.ecdsa_secp256r1_sha256: "secp256r1",
    SignatureScheme.ecdsa_secp384r1_sha384: "secp384r1",
    SignatureScheme.ecdsa_secp521r1_sha512: "secp521r1",
}

# Schemes TLS 1.3 allows in CertificateVerify: RSASSA-PKCS1-v1_5 and SHA-1
# are for certificates only (RFC 8446 section 4.2.3).
CERTIFICATE_VERIFY_SCHEMES = frozenset(
    scheme
    for scheme in SignatureScheme
    if not scheme.is_rsa_pkcs1 and scheme not in (SignatureScheme.ecdsa_sha1,)
)


def signed_content(context: bytes, transcript_hash: bytes) -> bytes:
    """Build the content a CertificateVerify signature covers (section 4.4.3)."""
    return b" " * 64 + context + b"\x00" + transcript_hash


def _load_system_file(path: Path) -> list[x509.Certificate]:
    """Parse each PEM certificate of a system store file on its own.

    One certificate that `cryptography` rejects (Debian's bundle has one with
    a non-positive serial, which cryptography 50 warns about and a later
    release will refuse) is skipped and logged, not the whole file.
    """
    certificates = []
    blocks = _PEM_CERTIFICATE_BLOCK.findall(path.read_bytes())
    for index, block in enumerate(blocks):
        try:
            # As an error, the warning skips the certificate before it is
            # stored, so later uses (the verifier reads the serial) cannot
            # print it to the user either.
            with warnings.catch_warnings():
                warnings.simplefilter("error", CryptographyDeprecationWarning)
                certificates.append(x509.load_pem_x509_certificate(block))
        except (ValueError, CryptographyDeprecationWarning) as error:
            logger.debug(
                "Skipped system CA certificate path=%s index=%d error=%s",
                path,
                index,
                error,
            )
    return certificates


def _system_certificates() -> list[x509.Certificate]:
    """Read the certificates of the default OpenSSL verify paths.

    Unreadable files in the system store are skipped with a log line, so one
    bad file in /etc/ssl/certs does not disable every CA.
    """
    paths = ssl.get_default_verify_paths()
    files: list[Path] = []
    if paths.cafile:
        files.append(Path(paths.cafile))
    if paths.capath and Path(paths.capath).is_dir():
        files += sorted(
            entry
            for entry in Path(paths.capath).iterdir()
            if _HASHED_NAME.match(entry.name)
        )
    certificates = []
    for path in files:
        try:
            certificates += _load_system_file(path)
        except OSError as error:
            logger.debug("Skipped system trust file path=%s error=%s", path, error)
    return certificates


class TrustStore:
    """The CA certificates a server chain must lead to."""

    def __init__(self, certificates: Sequence[x509.Certificate]) -> None:
        unique = {cert.fingerprint(hashes.SHA256()): cert for cert in certificates}
        if not unique:
            raise CertificateError(
                "no trusted CA certificates: the system store is empty or "
                "excluded and no trust bundle was given (pass a PEM bundle)"
            )
        self.certificates = list(unique.values())
        self._store = Store(self.certificates)
        self._anchors = frozenset(self.certificates)

    @classmethod
    def load(
        cls, extra_bundles: Sequence[Path] = (), *, include_system: bool = True
    ) -> TrustStore:
        """Load the system store (unless excluded) plus extra PEM bundles.

        Raise `CertificateError` naming the file when a bundle is unreadable,
        malformed or contains no certificate.
        """
        certificates = _system_certificates() if include_system else []
        for path in extra_bundles:
            try:
                data = path.read_bytes()
            except OSError as error:
                raise CertificateError(
                    f"{path}: cannot read trust bundle ({error.strerror})"
                ) from None
            if _PEM_CERTIFICATE_MARKER not in data:
                raise CertificateError(
                    f"{path}: trust bundle contains no PEM certificate "
                    "('-----BEGIN CERTIFICATE-----' block)"
                )
            try:
                certificates += x509.load_pem_x509_certificates(data)
            except ValueError as error:
                raise CertificateError(
                    f"{path}: invalid PEM trust bundle ({error})"
                ) from None
        return cls(certificates)

    def verify_server(
        self, chain: Sequence[x509.Certificate], server_name: str
    ) -> list[x509.Certificate]:
        """Verify `chain` (leaf first) for `server_name` at the current time.

        Return the verified chain, leaf first and ending at the trust anchor.
        Raise `CertificateVerifyFailed` with the reason.

        A leaf whose DER equals a trusted certificate is accepted as its own
        anchor after its validity period and names are checked, even when it
        is marked cA:TRUE (as `openssl req -x509` marks it). curl with
        OpenSSL and Go's crypto/x509 accept such a self-signed server the
        same way, while RFC 5280 path validation alone rejects it.
        """
        if not chain:
            raise CertificateVerifyFailed("server sent no certificate")
        now = datetime.datetime.now(datetime.UTC)
        if chain[0] in self._anchors:
            return _verify_pinned_leaf(chain[0], server_name, now)
        try:
            subject = _subject_for(server_name)
            verifier = (
                PolicyBuilder()
                .store(self._store)
                .time(now)
                .build_server_verifier(subject)
            )
        except ValueError as error:
            raise CertificateVerifyFailed(
                f"cannot verify host name {server_name!r}: {error} (cryptography "
                "accepts only letters, digits and hyphens in DNS names)"
            ) from None
        try:
            return verifier.verify(chain[0], list(chain[1:]))
        except VerificationError as error:
            failure = _verification_failure(str(error), chain[0], server_name, now)
            untrusted = self._untrusted_top(chain)
            if untrusted is not None and "does not match" not in str(failure):
                failure = _not_trusted(untrusted)
            raise failure from None

    def _untrusted_top(
        self, chain: Sequence[x509.Certificate]
    ) -> x509.Certificate | None:
        """Return the top of the presented chain when its issuer is untrusted.

        Follow issuer names from the leaf through the certificates the server
        sent. When the last one reached names an issuer that no trusted
        certificate has as its subject, no path can exist. The path builder
        of cryptography 50 may then report another reason, such as a max
        depth or a missing extension on the untrusted CA. Return None when a
        trusted certificate has that name, so the path builder's reason is
        the real one.
        """
        trusted_names = {certificate.subject for certificate in self.certificates}
        by_subject = {certificate.subject: certificate for certificate in chain[1:]}
        current = chain[0]
        # Each step removes a certificate from `by_subject`, so the chain's
        # length bounds the walk even when issuer names form a loop.
        for _ in range(len(chain)):
            if current.issuer in trusted_names:
                return None
            issuer = by_subject.pop(current.issuer, None)
            if issuer is None:
                break
            current = issuer
        return current


def _subject_for(server_name: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        # A fully qualified "example.com." names the same host as the SAN
        # "example.com", which never carries the trailing dot.
        return x509.DNSName(server_name.rstrip("."))


def _verify_pinned_leaf(
    leaf: x509.Certificate, server_name: str, now: datetime.datetime
) -> list[x509.Certificate]:
    """Check the validity period and names of a leaf that is itself trusted.

    The trust comes from the exact DER match, so only the checks that do not
    depend on a chain remain.
    """
    subject = leaf.subject.rfc4514_string()
    if now > leaf.not_valid_after_utc:
        raise CertificateVerifyFailed(
            f"certificate {subject!r} expired at "
            f"{leaf.not_valid_after_utc.isoformat()}",
            AlertDescription.certificate_expired,
        )
    if now < leaf.not_valid_before_utc:
        raise CertificateVerifyFailed(
            f"certificate {subject!r} is not valid before "
            f"{leaf.not_valid_before_utc.isoformat()}",
            AlertDescription.certificate_expired,
        )
    if not _leaf_matches_name(leaf, server_name):
        names = ", ".join(repr(name) for name in _san_names(leaf)) or "no names"
        raise CertificateVerifyFailed(
            f"certificate for {names} does not match {server_name!r}"
        )
    return [leaf]


def _leaf_matches_name(leaf: x509.Certificate, server_name: str) -> bool:
    """Match `server_name` against the leaf's SANs (RFC 6125 section 6.4).

    An IP literal matches an equal IPAddress SAN. A DNS name matches a
    DNSName SAN case-insensitively, and a wildcard SAN "*.example.com"
    matches exactly one leftmost label. The Common Name is never used.
    """
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return False
    try:
        address = ipaddress.ip_address(server_name)
    except ValueError:
        address = None
    if address is not None:
        return address in san.value.get_values_for_type(x509.IPAddress)
    host = server_name.rstrip(".").lower()
    for pattern in san.value.get_values_for_type(x509.DNSName):
        pattern = pattern.rstrip(".").lower()
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host:
            first_label, rest = host.split(".", 1)
            if first_label and rest == pattern[2:]:
                return True
    return False


def _san_names(leaf: x509.Certificate) -> list[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return []
    names = [str(name) for name in san.value.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)]
    return names


def _not_trusted(top: x509.Certificate) -> CertificateVerifyFailed:
    """Name the untrusted issuer (or self-signed certificate) and the fix."""
    subject = top.subject.rfc4514_string()
    if top.issuer == top.subject:
        # A man in the middle can present a self-signed certificate too, so
        # the message names what to compare before trusting it.
        fingerprint = top.fingerprint(hashes.SHA256()).hex(":").upper()
        return CertificateVerifyFailed(
            f"certificate not trusted: {subject!r} is self-signed and not in the "
            "trust store; if you expect this certificate, check that its SHA-256 "
            f"fingerprint {fingerprint} is the server's, then add it with "
            "--trust FILE",
            AlertDescription.unknown_ca,
        )
    issuer = top.issuer.rfc4514_string()
    return CertificateVerifyFailed(
        f"certificate not trusted: issuer {issuer!r} of {subject!r} is not in "
        "the trust store; add that CA's certificate with --trust FILE",
        AlertDescription.unknown_ca,
    )


def _verification_failure(
    message: str, leaf: x509.Certificate, server_name: str, now: datetime.datetime
) -> CertificateVerifyFailed:
    """Turn a `VerificationError` message into an alert with a clear reason.

    NOTE: cryptography 50 reports failures as text only, so this matches its
    wording; an unknown wording falls back to bad_certificate with the
    original message.
    """
    subject = leaf.subject.rfc4514_string()
    missing = _MISSING_EXTENSION.search(message)
    if missing is not None:
        return _missing_extension(missing.group(1), message, leaf)
    if "subjectAltName" in message:
        names = ", ".join(repr(name) for name in _san_names(leaf)) or "no names"
        return CertificateVerifyFailed(
            f"certificate for {names} does not match {server_name!r}"
        )
    if "candidates exhausted" in message:
        issuer = leaf.issuer.rfc4514_string()
        detail = _clean_detail(message.partition("candidates exhausted:")[2])
        if not detail or detail == _NO_INTERIOR_ERRORS:
            return CertificateVerifyFailed(
                f"unknown issuer: no trusted CA leads to {subject!r} (issued by "
                f"{issuer!r}); add the CA to the trust bundle",
                AlertDescription.unknown_ca,
            )
        return CertificateVerifyFailed(
            f"no valid chain from {subject!r} (issued by {issuer!r}) to a "
            f"trusted CA: {detail}"
        )
    if "not valid at validation time" in message:
        if now > leaf.not_valid_after_utc:
            return CertificateVerifyFailed(
                f"certificate {subject!r} expired at "
                f"{leaf.not_valid_after_utc.isoformat()}",
                AlertDescription.certificate_expired,
            )
        return CertificateVerifyFailed(
            f"a certificate in the chain of {subject!r} is not valid now: {message}",
            AlertDescription.certificate_expired,
        )
    return CertificateVerifyFailed(
        f"certificate {subject!r} rejected: {_clean_detail(message)}"
    )


def _missing_extension(
    oid: str, message: str, leaf: x509.Certificate
) -> CertificateVerifyFailed:
    """Name the certificate that lacks a required extension, and the fix."""
    extension = _EXTENSION_NAMES.get(oid, oid)
    holder = _ENCOUNTERED_SUBJECT.search(message)
    if holder is not None:
        lacking = f"certificate {holder.group(1)!r}"
    else:
        # Path building reports no certificate: the leaf passed, so the
        # failure is in a CA on the way to the trust anchor.
        lacking = (
            f"the CA {leaf.issuer.rfc4514_string()!r} (or another CA on the path "
            f"from {leaf.subject.rfc4514_string()!r})"
        )
    fix = f"reissue it with {extension}"
    if extension == "keyUsage":
        # OpenSSL 3.0's `req -x509` makes a CA without keyUsage by default.
        fix += (
            " (for a CA made with `openssl req -x509`, add "
            "-addext 'keyUsage=critical,keyCertSign,cRLSign')"
        )
    return CertificateVerifyFailed(
        f"{lacking} has no {extension} extension ({oid}), which the RFC 5280 "
        f"profile that kmsproxy verifies against requires; {fix}"
    )


def _clean_detail(message: str) -> str:
    """Drop the Python and Rust reprs cryptography appends to its reasons."""
    message = _ENCOUNTERED_TAIL.sub("", message)
    message = _ALGORITHM_IDENTIFIER.sub(r"\1", message)
    return message.strip()


def parse_certificate_chain(cert_data: Sequence[bytes]) -> list[x509.Certificate]:
    """Parse DER certificates; raise `BadCertificate` for malformed DER.

    A certificate that cryptography 50 parses only with a deprecation
    warning (a serial number that is not positive, which RFC 5280 forbids)
    is rejected too. Later releases reject it anyway, and the warning would
    otherwise be printed to the user.
    """
    chain = []
    for index, der in enumerate(cert_data):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", CryptographyDeprecationWarning)
                chain.append(x509.load_der_x509_certificate(der))
        except CryptographyDeprecationWarning as warning:
            raise BadCertificate(
                f"certificate {index} in the chain is invalid: {warning}"
            ) from None
        except (ValueError, x509.InvalidVersion) as error:
            # InvalidVersion, for a version field other than v1 or v3, is not
            # a ValueError in cryptography 50.
            raise BadCertificate(
                f"certificate {index} in the chain is not valid DER: {error}"
            ) from None
    return chain


def leaf_public_key(leaf: x509.Certificate) -> PublicKey:
    """Return the leaf's public key; raise `UnsupportedCertificate` for other
    key types (DSA, X25519, unknown algorithms)."""
    try:
        key = leaf.public_key()
    except (UnsupportedAlgorithm, ValueError) as error:
        raise UnsupportedCertificate(f"server key is not supported: {error}") from None
    if not isinstance(
        key,
        ec.EllipticCurvePublicKey
        | rsa.RSAPublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise UnsupportedCertificate(
            f"server key type {type(key).__name__} cannot sign in TLS 1.3"
        )
    return key


def check_scheme_fits_key(
    scheme: SignatureScheme, leaf: x509.Certificate, key: PublicKey
) -> None:
    """Raise `IllegalParameter` when `scheme` cannot be used with `key`.

    RFC 8446 section 4.2.3 binds each ECDSA scheme to one curve, rsa_pss_rsae
    to rsaEncryption keys and rsa_pss_pss to RSASSA-PSS keys.
    """
    fits = False
    if scheme.is_ecdsa and isinstance(key, ec.EllipticCurvePublicKey):
        fits = _ECDSA_SCHEME_CURVES.get(scheme) == key.curve.name
    elif scheme.is_rsa_pss and isinstance(key, rsa.RSAPublicKey):
        algorithm = leaf.public_key_algorithm_oid
        if scheme.name.startswith("rsa_pss_rsae"):
            fits = algorithm == PublicKeyAlgorithmOID.RSAES_PKCS1_v1_5
        else:
            fits = algorithm == PublicKeyAlgorithmOID.RSASSA_PSS
    elif scheme == SignatureScheme.ed25519:
        fits = isinstance(key, ed25519.Ed25519PublicKey)
    elif scheme == SignatureScheme.ed448:
        fits = isinstance(key, ed448.Ed448PublicKey)
    if not fits:
        raise IllegalParameter(
            f"server signed with {scheme.name}, which does not fit its "
            f"{type(key).__name__}"
        )


def verify_server_signature(
    leaf: x509.Certificate,
    algorithm: int,
    signature: bytes,
    transcript_hash: bytes,
    offered: Sequence[SignatureScheme],
) -> None:
    """Check the server's CertificateVerify (RFC 8446 section 4.4.3).

    Raise `IllegalParameter` for a scheme we did not offer or that does not
    fit the key, and `DecryptError` when the signature does not verify.
    """
    try:
        scheme = SignatureScheme(algorithm)
    except ValueError:
        raise IllegalParameter(
            f"server signed with unknown scheme 0x{algorithm:04x}"
        ) from None
    if scheme not in offered or scheme not in CERTIFICATE_VERIFY_SCHEMES:
        raise IllegalParameter(
            f"server signed with {scheme.name}, which we did not offer"
        )
    key = leaf_public_key(leaf)
    check_scheme_fits_key(scheme, leaf, key)
    content = signed_content(SERVER_CONTEXT, transcript_hash)
    try:
        verify_signature(key, signature, content, scheme)
    except (InvalidSignature, ValueError):
        raise DecryptError(
            f"server CertificateVerify signature ({scheme.name}) is invalid"
        ) from None
