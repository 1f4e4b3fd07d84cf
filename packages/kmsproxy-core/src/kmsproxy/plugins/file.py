"""The built-in file backend: private keys and certificate chains on disk.

Arguments reach it as existing paths or as `file:path=/some/key.pem`. Keys
may be PEM or DER, PKCS#8 or the traditional RSA/EC formats. An encrypted
key needs `file:path=...;password-file=/path/to/password`, whose first line
is the password. Any other URI attribute is rejected, so that a misspelt or
misplaced one (a `pin=` meant for another backend) does not go unnoticed.
Certificates are PEM (one or more, leaf first) or a single DER certificate;
the file is watched for reloads.

This module is also the shortest complete example of a backend.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from kmsproxy.certificates import CertificateError, CertificateSource
from kmsproxy.files import read_key_file
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.secrets import SecretFileError, read_secret_file
from kmsproxy.signer import PrivateKey, Signer, SignerError, SoftwareSigner
from kmsproxy.uri import KeyURI, URIError, redact_text, reject_unknown_attributes

SCHEME = "file"

# Attributes of a `file:` URI. `password-file` is accepted for certificates
# too, so the URI of a key file that also contains its chain works for both.
KNOWN_ATTRIBUTES = frozenset({"path", "password-file"})

# `file:` and the text up to the first attribute separator.
_FIRST_PART = re.compile(r"^file:([^;?]*)", re.IGNORECASE)


@hookimpl
def kmsproxy_schemes() -> list[str]:
    return [SCHEME]


@hookimpl
def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
    if uri.scheme != SCHEME:
        return None
    path = _path(uri)
    password = _read_password(uri)
    return SoftwareSigner(load_private_key(path, password), str(path))


@hookimpl
def kmsproxy_open_certificates(uri: KeyURI) -> CertificateSource | None:
    if uri.scheme != SCHEME:
        return None
    return FileCertificateSource(_path(uri))


def reject_bare_path(text: str) -> None:
    """Raise `URIError` for `file:/some/key.pem`, naming the `path=` form.

    The message shows the path, because a path is not a secret. Attributes
    after it are redacted as in any URI error. `file:///some/key.pem`, the
    RFC 8089 form, gets the same hint with the path after `file://`.
    """
    match = _FIRST_PART.match(text)
    if match is None:
        return
    first = match.group(1)
    if not first or "=" in first:
        return
    rest = text[match.end(1) :]
    if "path=" in rest:
        # The path is there, so the bare first part is something else, which
        # may be a secret: the URI parser reports it without showing it.
        return
    path = first[2:] if first.startswith("///") else first
    fixed = redact_text(f"{SCHEME}:path={path}{rest}")
    typed = f"{SCHEME}:{first}{fixed.removeprefix(f'{SCHEME}:path={path}')}"
    hint = f"write {shlex.quote(fixed)}"
    if "***" in fixed:
        # A redacted value cannot be typed back, so only the start is given.
        hint = f"start it with {shlex.quote(f'{SCHEME}:path={path}')}"
    if not rest:
        hint += f" or the bare path {shlex.quote(unquote(path))}"
    raise URIError(f"{typed}: missing path= before the path; {hint}")


def _path(uri: KeyURI) -> Path:
    reject_unknown_attributes(uri, KNOWN_ATTRIBUTES)
    text = uri.get("path")
    if not text:
        raise ValueError(f"{uri.redacted()}: missing path= (file:path=/some/key.pem)")
    return Path(text).expanduser()


def _read_password(uri: KeyURI) -> bytes | None:
    password_file = uri.get("password-file")
    if password_file is None:
        return None
    try:
        return read_secret_file(Path(password_file).expanduser(), "password-file")
    except SecretFileError as error:
        raise SignerError(f"{uri.redacted()}: {error}") from None


def load_private_key(path: Path, password: bytes | None = None) -> PrivateKey:
    """Read a PEM or DER private key; raise `SignerError` naming the file."""
    try:
        data = read_key_file(path)
    except OSError as error:
        raise SignerError(f"{path}: cannot read key: {error.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password)
        else:
            key = serialization.load_der_private_key(data, password)
    except TypeError:
        if password is None:
            # Quoted for a shell, because the `;` would end the command.
            uri = shlex.quote(f"file:path={path};password-file=FILE")
            raise SignerError(
                f"{path}: the key is encrypted; give its password with "
                f"{uri}, or decrypt it with "
                f"`openssl pkey -in {shlex.quote(str(path))} -out DECRYPTED.key`"
            ) from None
        raise SignerError(
            f"{path}: the key is not encrypted; drop password-file"
        ) from None
    except ValueError as error:
        if password is not None and "password" in str(error).lower():
            raise SignerError(f"{path}: wrong password for the key") from None
        if b"-----BEGIN CERTIFICATE-----" in data:
            raise SignerError(
                f"{path}: contains a certificate where a private key is "
                "expected; check the order of the key and certificate arguments"
            ) from None
        raise SignerError(
            f"{path}: not a PEM or DER private key (PKCS#8, RSA or EC): {error}"
        ) from None
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise SignerError(
            f"{path}: {type(key).__name__} keys cannot sign TLS handshakes; "
            "use an ECDSA, RSA or Ed25519 key"
        )
    return key


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Read PEM certificates (leaf first) or one DER certificate."""
    try:
        data = read_key_file(path)
    except OSError as error:
        raise CertificateError(
            f"{path}: cannot read certificate: {error.strerror}"
        ) from None
    try:
        if b"-----BEGIN" in data:
            chain = x509.load_pem_x509_certificates(data)
        else:
            chain = [x509.load_der_x509_certificate(data)]
    except ValueError as error:
        if b"PRIVATE KEY-----" in data and b"-----BEGIN CERTIFICATE" not in data:
            raise CertificateError(
                f"{path}: contains a private key but no certificate"
            ) from None
        raise CertificateError(
            f"{path}: not a PEM or DER certificate: {error}"
        ) from None
    if not chain:
        raise CertificateError(f"{path}: contains no certificate")
    return chain


class FileCertificateSource(CertificateSource):
    """A certificate chain in one file, reloaded when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def uri(self) -> str:
        return str(self.path)

    async def load(self) -> list[x509.Certificate]:
        return load_certificates(self.path)

    def watch_paths(self) -> Sequence[Path]:
        return (self.path,)
