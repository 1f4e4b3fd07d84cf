"""The local certificate authority and the leaf certificates it mints.

The proxy terminates the client's TLS with a certificate for the requested
host, issued on the spot by a CA that the user trusts. The CA key is a
`Signer`, so it may live in a file today and in a TPM or YubiKey later.

`cryptography`'s `CertificateBuilder` signs only with its own private key
types, so `LocalCA.sign` works in steps. It first signs the certificate
with a throwaway key of the same algorithm, so that the TBSCertificate
carries the right signature AlgorithmIdentifier. It then signs the
TBSCertificate bytes through the `Signer` and assembles the X.509
Certificate (RFC 5280 section 4.1) with a small DER writer.

`LeafMinter` owns the minted `ssl.SSLContext`s: one software leaf key per
process, contexts cached in a bounded LRU, one mint per key at a time.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import ssl
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import anyio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmsproxy import der
from kmsproxy.errors import UserError
from kmsproxy.signer import PrivateKey, PublicKey, SignatureScheme, Signer, SignerError

logger = logging.getLogger(__name__)

# Maximum lifetime of a minted leaf. A day keeps a leaked leaf short-lived
# (the Go tool minted one-year leaves), and a cached context is re-minted
# only when its leaf nears expiry.
MINTED_MAX_LIFETIME = datetime.timedelta(hours=24)

# Minted leaves start this far in the past, so a client whose clock runs a
# few minutes behind still accepts them.
CLOCK_SKEW_ALLOWANCE = datetime.timedelta(minutes=5)

# A cached context is minted again once its leaf has less than this left,
# so no client receives a certificate that expires mid-handshake.
RENEW_BEFORE_EXPIRY = datetime.timedelta(minutes=5)

# Maximum number of minted SSLContexts kept, least recently used evicted
# first. Each context costs a few KiB; 256 upstreams cover a busy desktop.
CONTEXT_CACHE_SIZE = 256

# Lifetime of a CA created by `kmsproxy init`: ten years, because users
# install it in trust stores by hand and re-trusting it is a chore.
CA_LIFETIME = datetime.timedelta(days=3650)

# Maximum seconds the CA `Signer` may take for one certificate. A hardware
# CA key can wait for a touch or a PIN, so this allows a person to act. A
# hung device then fails the mint and frees the upstream's lock, instead of
# stalling every later CONNECT to that upstream. The proxy may wrap the
# whole mint in a shorter timeout of its own.
CA_SIGN_TIMEOUT_SECONDS = 30.0

# X.520 ub-common-name is 64 characters, but `cryptography` limits the
# encoded CN to 64 bytes, so a longer CN is dropped and the SANs carry the
# names (RFC 6125 clients match SANs only).
MAX_COMMON_NAME_BYTES = 64

# Key usage of every end-entity certificate kmsproxy mints or requests: the
# key signs handshakes (TLS 1.3 and ECDHE in TLS 1.2) and nothing else.
SIGNING_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)

# RFC 1035 section 2.3.4: at most 253 characters in a name written without
# the trailing dot, and at most 63 in each label.
MAX_DNS_NAME_LENGTH = 253
MAX_DNS_LABEL_LENGTH = 63

# One DNS label in A-label form. The underscore is allowed because the
# CONNECT parser allows it (service names such as `_acme.example`).
_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")


class MintError(Exception):
    """Minting a leaf for `host` failed; `reason` says why.

    The names of a trusted upstream certificate leave nothing that can be
    encoded, or the CA `Signer` failed or timed out.
    """

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"cannot mint a certificate for {host!r}: {reason}")
        self.host = host
        self.reason = reason


@dataclass(frozen=True)
class LeafRequest:
    """The content of a leaf to mint: subject CN, SANs, latest expiry, ALPN."""

    common_name: str
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    not_after: datetime.datetime | None = None
    alpn_protocols: tuple[str, ...] = ()


def choose_ca_scheme(signer: Signer, *, role: str = "CA key") -> SignatureScheme:
    """Pick the scheme that `signer` signs certificates (or requests) with.

    ECDSA uses its curve's hash; RSA prefers PKCS#1 v1.5 with SHA-256, the
    X.509 convention every client accepts, then RSA-PSS, then the SHA-384
    and SHA-512 variants for a store that offers no SHA-256; EdDSA is fixed.
    `role` names the key in the error, such as "CA key" or "key".
    """
    preference = (
        SignatureScheme.ecdsa_secp256r1_sha256,
        SignatureScheme.ecdsa_secp384r1_sha384,
        SignatureScheme.ecdsa_secp521r1_sha512,
        SignatureScheme.rsa_pkcs1_sha256,
        SignatureScheme.rsa_pss_rsae_sha256,
        SignatureScheme.ed25519,
        SignatureScheme.ed448,
        SignatureScheme.rsa_pkcs1_sha384,
        SignatureScheme.rsa_pkcs1_sha512,
        SignatureScheme.rsa_pss_rsae_sha384,
        SignatureScheme.rsa_pss_rsae_sha512,
    )
    for scheme in preference:
        if scheme in signer.schemes:
            return scheme
    offered = ", ".join(s.name for s in signer.schemes) or "none"
    raise SignerError(
        f"{signer.uri}: the {role} offers no scheme usable for certificates "
        f"(offered: {offered}); use an ECDSA, RSA or Ed25519 key"
    )


class LocalCA:
    """A CA certificate and its key as a `Signer`; signs certificates."""

    def __init__(self, certificate: x509.Certificate, signer: Signer) -> None:
        if certificate.public_key() != signer.public_key():
            raise SignerError(
                f"{signer.uri}: the CA key does not match the CA certificate "
                f"{certificate.subject.rfc4514_string()!r}; give the key that "
                "`kmsproxy init` used (the URI or file it printed)"
            )
        _check_ca_certificate(certificate)
        self.certificate = certificate
        self.signer = signer
        self.scheme = choose_ca_scheme(signer)
        self._authority_key_identifier = _authority_key_identifier(certificate)
        if self.scheme in (SignatureScheme.ed25519, SignatureScheme.ed448):
            logger.warning(
                "The CA key is %s: browsers and most TLS clients reject "
                "certificates signed with it; use an ECDSA P-256 CA "
                "ca=%s",
                self.scheme.name,
                certificate.subject.rfc4514_string(),
            )
        self._template_key: PrivateKey | None = None
        self.signed_count = 0

    async def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a certificate built with every field but the issuer set.

        Raise `SignerError` when the signer fails or its signature does not
        verify against the CA certificate.
        """
        builder = builder.issuer_name(self.certificate.subject)
        if self._template_key is None:
            self._template_key = template_key_for(self.scheme)
        signed = await sign_through_signer(
            builder,
            self.signer,
            self.scheme,
            timeout_seconds=CA_SIGN_TIMEOUT_SECONDS,
            role="the CA key",
            template_key=self._template_key,
        )
        certificate = x509.load_der_x509_certificate(signed)
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError) as error:
            raise SignerError(
                f"{self.signer.uri}: the CA key produced a signature that does "
                f"not verify against the CA certificate ({error or 'bad signature'})"
            ) from error
        self.signed_count += 1
        return certificate

    async def mint_leaf(
        self,
        request: LeafRequest,
        public_key: ec.EllipticCurvePublicKey,
        *,
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """Issue a serverAuth leaf for `request` over `public_key`.

        Validity starts `CLOCK_SKEW_ALLOWANCE` back and ends at the earliest
        of `request.not_after`, `MINTED_MAX_LIFETIME` from now and the CA's
        own expiry. Names that X.509 cannot encode are dropped. Raise
        `MintError` when no SAN remains or the CA has expired, and
        `SignerError` when the CA key fails or takes longer than
        `CA_SIGN_TIMEOUT_SECONDS`.
        """
        now = now or datetime.datetime.now(datetime.UTC)
        ca_not_after = self.certificate.not_valid_after_utc
        if ca_not_after <= now:
            raise MintError(
                request.common_name,
                f"the CA certificate expired at {ca_not_after.isoformat()}; "
                "renew it, or create a new CA with `kmsproxy init --force`",
            )
        not_after = min(now + MINTED_MAX_LIFETIME, ca_not_after)
        if request.not_after is not None:
            not_after = min(not_after, request.not_after)
        not_before = min(now - CLOCK_SKEW_ALLOWANCE, not_after)
        names = _subject_alternative_names(request)
        if not names:
            raise MintError(
                request.common_name,
                "the upstream certificate has no DNS name or IP address that a "
                "certificate can carry",
            )
        common_name = _encodable_common_name(request.common_name)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
            if common_name is not None
            else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                SIGNING_KEY_USAGE,
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(self._authority_key_identifier, critical=False)
            # RFC 5280 section 4.2.1.6: with an empty subject, the SAN
            # extension must be critical.
            .add_extension(
                x509.SubjectAlternativeName(names), critical=common_name is None
            )
        )
        return await self.sign(builder)


def leaf_request_for_upstream(
    upstream_leaf: x509.Certificate,
    server_name: str,
    alpn_protocols: Sequence[str] = (),
) -> LeafRequest:
    """Describe a leaf that mirrors the upstream's names and expiry.

    The CONNECT host is always among the SANs, so the client's name check
    passes even when the upstream was reached by an IP address or unverified.
    A trusted upstream may still carry names that X.509 cannot encode again:
    a CN over 64 bytes, an empty CN, a Unicode DNS name or a malformed
    wildcard. Such a CN falls back to `server_name` (or to none), Unicode
    names become A-labels, and the rest are dropped.
    """
    with warnings.catch_warnings():
        # cryptography warns about a CN it would not create, such as "".
        warnings.simplefilter("ignore", UserWarning)
        common_names = upstream_leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    candidates = [str(common_names[0].value)] if common_names else []
    common_name = next(
        (c for c in [*candidates, server_name] if _encodable_common_name(c)), ""
    )
    dns_names: list[str] = []
    ip_addresses: list[str] = []
    try:
        sans = upstream_leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        dns_names = list(sans.get_values_for_type(x509.DNSName))
        ip_addresses = [str(a) for a in sans.get_values_for_type(x509.IPAddress)]
    except (x509.ExtensionNotFound, ValueError):
        # cryptography raises ValueError while parsing a malformed SAN.
        pass
    try:
        ip_addresses.append(str(ipaddress.ip_address(server_name)))
    except ValueError:
        dns_names.append(server_name)
    a_labels = (dns_name_for_san(name) for name in dns_names)
    valid_dns_names = tuple(dict.fromkeys(n for n in a_labels if n is not None))
    if not valid_dns_names and not ip_addresses:
        raise MintError(
            server_name,
            "neither the host nor the upstream certificate has a DNS name or "
            "IP address that a certificate can carry",
        )
    return LeafRequest(
        common_name=common_name,
        dns_names=valid_dns_names,
        ip_addresses=tuple(dict.fromkeys(ip_addresses)),
        not_after=upstream_leaf.not_valid_after_utc,
        alpn_protocols=tuple(alpn_protocols),
    )


def leaf_request_for_listener(host: str) -> LeafRequest:
    """Describe the listener's own leaf: its host plus the loopback names."""
    dns_names = ["localhost"]
    ip_addresses = ["127.0.0.1", "::1"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        dns_names.append(host.lower())
    else:
        # No client connects to 0.0.0.0 or ::, so they are no use as a SAN.
        if not address.is_unspecified:
            ip_addresses.append(str(address))
    return LeafRequest(
        common_name=host,
        dns_names=tuple(dict.fromkeys(dns_names)),
        ip_addresses=tuple(dict.fromkeys(ip_addresses)),
    )


@dataclass
class _CacheEntry:
    context: ssl.SSLContext
    certificate: x509.Certificate


class LeafMinter:
    """Server `SSLContext`s with minted leaves, cached and minted once each.

    The cache key is the upstream leaf's SHA-256 fingerprint (or the listener
    host) plus the names and ALPN; concurrent requests for one key wait on a
    per-key lock, so the CA signs once. All leaves share one P-256 key made
    at start, which never leaves this process.

    Building that key parses the upstream leaf's names, so a second map
    takes each (upstream leaf, SNI, ALPN) seen before straight to its key.
    Certificates compare and hash by their DER bytes, so a leaf that
    differs in any byte misses, and its names are parsed again.
    """

    def __init__(self, ca: LocalCA, cache_size: int = CONTEXT_CACHE_SIZE) -> None:
        self.ca = ca
        self.cache_size = cache_size
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._cache: collections.OrderedDict[tuple[object, ...], _CacheEntry] = (
            collections.OrderedDict()
        )
        self._upstream_keys: collections.OrderedDict[
            tuple[x509.Certificate, str, tuple[str, ...]], tuple[object, ...]
        ] = collections.OrderedDict()
        self._locks: dict[tuple[object, ...], anyio.Lock] = {}
        # Every leaf minted, and the part of them for the proxy's own
        # listeners (`context_for_listener`).
        self.mint_count = 0
        self.listener_mint_count = 0

    @property
    def cached_count(self) -> int:
        return len(self._cache)

    async def context_for_upstream(
        self,
        upstream_leaf: x509.Certificate,
        server_name: str,
        alpn_protocols: Sequence[str] = (),
    ) -> ssl.SSLContext:
        """Return a server context whose leaf mirrors `upstream_leaf`.

        Raise `MintError` when the names cannot be encoded, or when the CA
        key fails or takes longer than `CA_SIGN_TIMEOUT_SECONDS`.
        """
        context = self.cached_context_for_upstream(
            upstream_leaf, server_name, alpn_protocols
        )
        if context is not None:
            return context
        fingerprint = upstream_leaf.fingerprint(hashes.SHA256())
        request = leaf_request_for_upstream(upstream_leaf, server_name, alpn_protocols)
        key = (fingerprint, request)
        try:
            context = await self._context(key, request)
        except MintError:
            raise
        except (SignerError, ValueError) as error:
            # ValueError: cryptography rejected a name the filters let pass.
            raise MintError(server_name, str(error)) from error
        upstream_key = (upstream_leaf, server_name, tuple(alpn_protocols))
        self._upstream_keys[upstream_key] = key
        self._upstream_keys.move_to_end(upstream_key)
        while len(self._upstream_keys) > self.cache_size:
            self._upstream_keys.popitem(last=False)
        return context

    def cached_context_for_upstream(
        self,
        upstream_leaf: x509.Certificate,
        server_name: str,
        alpn_protocols: Sequence[str] = (),
    ) -> ssl.SSLContext | None:
        """Return the cached context for these arguments, or None.

        Only arguments that `context_for_upstream` has served before are
        found, and only while their leaf is cached and not near expiry.
        It is synchronous and does not mint, so a caller can skip the
        timeout around `context_for_upstream` when it succeeds.
        """
        key = self._upstream_keys.get(
            (upstream_leaf, server_name, tuple(alpn_protocols))
        )
        if key is None:
            return None
        entry = self._fresh_entry(key)
        return entry.context if entry is not None else None

    async def context_for_listener(self, host: str) -> ssl.SSLContext:
        """Return the context for the proxy's own TLS port (and the PAC port).

        Raise `MintError` when the CA has expired, or when the CA key fails
        or takes longer than `CA_SIGN_TIMEOUT_SECONDS`.
        """
        request = leaf_request_for_listener(host)
        try:
            return await self._context(("listener", request), request)
        except SignerError as error:
            raise MintError(host, str(error)) from error

    async def _context(
        self, key: tuple[object, ...], request: LeafRequest
    ) -> ssl.SSLContext:
        entry = self._fresh_entry(key)
        if entry is not None:
            return entry.context
        lock = self._locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                entry = self._fresh_entry(key)
                if entry is None:
                    entry = await self._mint(request)
                    self._store(key, entry)
                    # Upstream keys start with a fingerprint (bytes), which
                    # is never compared with a str (python -bb warns).
                    if isinstance(key[0], str) and key[0] == "listener":
                        self.listener_mint_count += 1
                return entry.context
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._locks.pop(key, None)

    def _fresh_entry(self, key: tuple[object, ...]) -> _CacheEntry | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        now = datetime.datetime.now(datetime.UTC)
        if entry.certificate.not_valid_after_utc - now < RENEW_BEFORE_EXPIRY:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry

    def _store(self, key: tuple[object, ...], entry: _CacheEntry) -> None:
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _mint(self, request: LeafRequest) -> _CacheEntry:
        public_key = self.leaf_key.public_key()
        certificate = await self.ca.mint_leaf(request, public_key)
        self.mint_count += 1
        logger.debug(
            "Minted certificate subject=%s not_after=%s",
            certificate.subject.rfc4514_string(),
            certificate.not_valid_after_utc.isoformat(),
        )
        context = server_context(
            [certificate, self.ca.certificate], self.leaf_key, request.alpn_protocols
        )
        return _CacheEntry(context=context, certificate=certificate)


def server_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    alpn_protocols: Sequence[str] = (),
) -> ssl.SSLContext:
    """Build a TLS server context for `chain` (leaf first) and `key`.

    `ssl` loads certificates only from files, so the PEM goes into a private
    (mode 0700) temporary directory and is unlinked as soon as it is loaded.
    The key is written encrypted under a one-off password, so a copy left on
    a disk-backed temporary directory after a crash reveals nothing.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn_protocols:
        context.set_alpn_protocols(list(alpn_protocols))
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    password = secrets.token_bytes(32)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    # mkdtemp, under TemporaryDirectory, creates the directory with mode 0700.
    with tempfile.TemporaryDirectory(prefix="kmsproxy-") as directory:
        chain_path = Path(directory, "chain.pem")
        key_path = Path(directory, "key.pem")
        _write_private(chain_path, chain_pem)
        _write_private(key_path, key_pem)
        try:
            context.load_cert_chain(chain_path, key_path, password=password)
        finally:
            key_path.unlink()
            chain_path.unlink()
    return context


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def create_ca_certificate(
    private_key: PrivateKey,
    common_name: str = "kmsproxy local CA",
    *,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """Create a self-signed CA certificate for `kmsproxy init`."""
    builder = ca_certificate_builder(private_key.public_key(), common_name, now=now)
    if isinstance(private_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return builder.sign(private_key, None)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if private_key.curve.key_size > 384:
            return builder.sign(private_key, hashes.SHA512())
        if private_key.curve.key_size > 256:
            return builder.sign(private_key, hashes.SHA384())
    return builder.sign(private_key, hashes.SHA256())


def ca_certificate_builder(
    public_key: PublicKey,
    common_name: str = "kmsproxy local CA",
    *,
    now: datetime.datetime | None = None,
) -> x509.CertificateBuilder:
    """Build the local CA's self-issued certificate, ready to sign.

    pathLenConstraint 0 limits the CA to issuing leaves; the CA can never
    sign another CA. A key held in a device signs the builder through
    `sign_with_template_key` and its `Signer`.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
    )


def _check_ca_certificate(certificate: x509.Certificate) -> None:
    """Raise `UserError` for a CA certificate that cannot issue leaves now."""
    subject = certificate.subject.rfc4514_string()
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise UserError(
            f"CA certificate {subject!r} is not a CA (basicConstraints cA is "
            "not set); create one with `kmsproxy init`"
        )
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise UserError(
            f"CA certificate {subject!r} may not sign certificates (keyUsage "
            "lacks keyCertSign); create one with `kmsproxy init`"
        )
    not_after = certificate.not_valid_after_utc
    if not_after <= datetime.datetime.now(datetime.UTC):
        raise UserError(
            f"CA certificate {subject!r} expired at {not_after.isoformat()}; "
            "renew it, or create a new CA with `kmsproxy init --force`"
        )


def _authority_key_identifier(
    certificate: x509.Certificate,
) -> x509.AuthorityKeyIdentifier:
    """Return the AKI for leaves of `certificate`, RFC 5280 section 4.2.1.1.

    OpenSSL finds the issuer by matching the leaf's AKI with the CA's SKI,
    and a CA made by another tool (or with an RFC 7093 SHA-256 SKI) need not
    use the SHA-1 form that `from_issuer_public_key` computes, so the CA's
    own SKI is copied when it has one.
    """
    try:
        ski = certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            certificate.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _encodable_common_name(name: str) -> str | None:
    """Return `name` when it fits a CN attribute, else None."""
    if not name or len(name.encode("utf-8")) > MAX_COMMON_NAME_BYTES:
        return None
    return name


def dns_name_for_san(name: str) -> str | None:
    """Return `name` as an A-label dNSName for a SAN, or None if it has none.

    A Unicode name is converted with IDNA 2003 (the stdlib codec). A
    wildcard is kept only as the whole leftmost label above at least two
    more labels (RFC 6125 section 6.4.3), so `*`, `*.com` and `a*.b.c` go.
    """
    name = name.rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not name or len(name) > MAX_DNS_NAME_LENGTH:
        return None
    labels = name.split(".")
    if labels[0] == "*":
        if len(labels) < 3:
            return None
        labels = labels[1:]
    for label in labels:
        if len(label) > MAX_DNS_LABEL_LENGTH or not _DNS_LABEL.fullmatch(label):
            return None
    return name


def _subject_alternative_names(request: LeafRequest) -> list[x509.GeneralName]:
    """Return the request's encodable SANs; with none, the CN as a SAN.

    Clients match host names against SANs only (RFC 6125), so a leaf whose
    request names no SAN carries its CN there.
    """
    dns_names = request.dns_names
    ip_addresses = request.ip_addresses
    if not dns_names and not ip_addresses:
        try:
            ip_addresses = (str(ipaddress.ip_address(request.common_name)),)
        except ValueError:
            dns_names = (request.common_name,)
    names: list[x509.GeneralName] = []
    for text in dns_names:
        name = dns_name_for_san(text)
        if name is not None:
            names.append(x509.DNSName(name))
    for text in ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            continue
    return list(dict.fromkeys(names))


def template_key_for(scheme: SignatureScheme) -> PrivateKey:
    """Generate a throwaway key whose signatures carry `scheme`'s algorithm.

    For ECDSA the AlgorithmIdentifier names only the hash, so a P-256 key
    serves every curve; RSA needs an RSA key of any size.
    """
    if scheme.is_ecdsa:
        return ec.generate_private_key(ec.SECP256R1())
    if scheme.is_rsa_pkcs1 or scheme.is_rsa_pss:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if scheme == SignatureScheme.ed25519:
        return ed25519.Ed25519PrivateKey.generate()
    if scheme == SignatureScheme.ed448:
        return ed448.Ed448PrivateKey.generate()
    raise SignerError(f"no certificate signature algorithm for {scheme.name}")


@overload
def sign_with_template_key(
    builder: x509.CertificateBuilder, key: PrivateKey, scheme: SignatureScheme
) -> x509.Certificate: ...


@overload
def sign_with_template_key(
    builder: x509.CertificateSigningRequestBuilder,
    key: PrivateKey,
    scheme: SignatureScheme,
) -> x509.CertificateSigningRequest: ...


def sign_with_template_key(
    builder: x509.CertificateBuilder | x509.CertificateSigningRequestBuilder,
    key: PrivateKey,
    scheme: SignatureScheme,
) -> x509.Certificate | x509.CertificateSigningRequest:
    """Sign `builder` with a throwaway `key` the way `scheme` would sign.

    The result is thrown away too, except for its to-be-signed bytes and its
    signatureAlgorithm, which then name `scheme`'s algorithm and parameters.
    """
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return builder.sign(key, None)
    digest = scheme.hash_algorithm
    if not isinstance(digest, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
        raise SignerError(f"no certificate signature algorithm for {scheme.name}")
    if isinstance(key, rsa.RSAPrivateKey) and scheme.is_rsa_pss:
        # TLS fixes the PSS salt length to the digest length, so the
        # AlgorithmIdentifier must state the same salt length.
        pss = padding.PSS(padding.MGF1(digest), padding.PSS.DIGEST_LENGTH)
        return builder.sign(key, digest, rsa_padding=pss)
    return builder.sign(key, digest)


async def sign_through_signer(
    builder: x509.CertificateBuilder | x509.CertificateSigningRequestBuilder,
    signer: Signer,
    scheme: SignatureScheme,
    *,
    timeout_seconds: float,
    role: str,
    template_key: PrivateKey | None = None,
    rewrite: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """Sign `builder`'s content with a key that stays in `signer`'s store.

    Return the DER Certificate or CertificationRequest; the caller checks
    its signature. `cryptography` can sign only with a key it holds, so:

    1. A throwaway key of the same algorithm (`template_key`, or a new one)
       signs `builder`, so that `cryptography` encodes the to-be-signed part
       and the signatureAlgorithm. `rewrite`, if given, then changes the
       to-be-signed DER (a CSR puts the signer's subjectPKInfo in it).
    2. `signer` signs the to-be-signed DER within `timeout_seconds`; `role`
       names the key in the timeout message ("the CA key").
    3. The signed object is assembled around that signature: SEQUENCE
       { toBeSigned, signatureAlgorithm, signature } (RFC 5280 section 4.1,
       RFC 2986 section 4.2).

    Raise `SignerError` when the signer fails or times out.
    """
    key = template_key if template_key is not None else template_key_for(scheme)
    template = sign_with_template_key(builder, key, scheme)
    if isinstance(template, x509.Certificate):
        to_be_signed = template.tbs_certificate_bytes
    else:
        to_be_signed = template.tbs_certrequest_bytes
    algorithm = der.signature_algorithm(template.public_bytes(_DER))
    if rewrite is not None:
        to_be_signed = rewrite(to_be_signed)

    try:
        with anyio.fail_after(timeout_seconds):
            signature = await signer.sign(to_be_signed, scheme)
    except TimeoutError:
        raise SignerError(
            f"{signer.uri}: {role} did not sign within {timeout_seconds:g} s; "
            "check that the device is present and unlocked"
        ) from None

    return der.assemble_signed(to_be_signed, algorithm, signature)


_DER = serialization.Encoding.DER


def fingerprint_hex(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate, hex, for logs."""
    return hashlib.sha256(certificate.public_bytes(_DER)).hexdigest()
