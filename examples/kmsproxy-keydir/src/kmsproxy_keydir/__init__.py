"""An example kmsproxy backend: PEM keys kept in one directory, by name.

`keydir:name=client` names the key `client.key` and the certificate chain
`client.crt` in the directory given by `dir=`, by default `keydir` in
kmsproxy's configuration directory (`~/.config/kmsproxy/keydir` unless
XDG_CONFIG_HOME is set). `kmsproxy keydir create NAME` makes a key.

The key is read from disk for each signature, in a worker thread, the way a
hardware backend calls its device: the backend shows the `BlockingSigner`
contract without needing a device.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import anyio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from kmsproxy.certificates import CertificateError, CertificateSource
from kmsproxy.errors import UserError
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.signer import (
    BlockingSigner,
    PrivateKey,
    PublicKey,
    SignatureScheme,
    Signer,
    SignerError,
    schemes_for_public_key,
    sign_with_private_key,
)
from kmsproxy.uri import KeyURI

SCHEME = "keydir"

# One signature at a time for the whole backend, as a device with a single
# session would need. Other tunnels keep relaying while a signature runs.
_DEVICE_LIMITER = anyio.CapacityLimiter(1)


@hookimpl
def kmsproxy_schemes() -> list[str]:
    return [SCHEME]


@hookimpl
def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
    if uri.scheme != SCHEME:
        return None
    return KeyDirSigner(uri, _file_path(uri, ".key"), _DEVICE_LIMITER)


@hookimpl
def kmsproxy_open_certificates(uri: KeyURI) -> CertificateSource | None:
    if uri.scheme != SCHEME:
        return None
    return KeyDirCertificates(uri, _file_path(uri, ".crt"))


@hookimpl
def kmsproxy_add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(SCHEME, help="manage the keys of the keydir backend")
    commands = parser.add_subparsers(title="commands", required=True)
    create = commands.add_parser("create", help="create an ECDSA P-256 key")
    create.add_argument("name", help="the key's name, used as keydir:name=NAME")
    create.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"directory that contains the keys (default: {default_directory()})",
    )
    create.set_defaults(handler=create_key)


def _file_path(uri: KeyURI, suffix: str) -> Path:
    name = uri.get("name")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(
            f"{uri.redacted()}: name= must be a plain file name "
            "(for example keydir:name=client)"
        )
    directory = Path(uri.get("dir") or default_directory()).expanduser()
    return directory / f"{name}{suffix}"


def default_directory() -> Path:
    """Return `keydir` in the configuration directory that `kmsproxy init` uses."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "kmsproxy" / "keydir"


def _load_key(path: Path, uri: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as error:
        raise SignerError(f"{uri}: cannot read {path}: {error.strerror}") from None
    except (TypeError, ValueError) as error:
        raise SignerError(
            f"{uri}: {path} is not an unencrypted PEM key: {error}"
        ) from None
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise SignerError(f"{uri}: {type(key).__name__} keys cannot sign TLS")
    return key


class KeyDirSigner(BlockingSigner):
    """A key file read in a worker thread for each signature."""

    def __init__(self, uri: KeyURI, path: Path, limiter: anyio.CapacityLimiter) -> None:
        super().__init__(limiter)
        self._uri = uri.redacted()
        self._path = path
        # Opening the key at startup makes a wrong name fail before the proxy
        # starts, not in the first handshake.
        self._public_key = _load_key(path, self._uri).public_key()
        self._schemes = schemes_for_public_key(self._public_key)

    @property
    def uri(self) -> str:
        return self._uri

    def public_key(self) -> PublicKey:
        return self._public_key

    @property
    def schemes(self) -> Sequence[SignatureScheme]:
        return self._schemes

    def sign_blocking(self, data: bytes, scheme: SignatureScheme) -> bytes:
        return sign_with_private_key(_load_key(self._path, self._uri), data, scheme)


class KeyDirCertificates(CertificateSource):
    """The chain in NAME.crt, leaf first, reloaded when the file changes."""

    def __init__(self, uri: KeyURI, path: Path) -> None:
        self._uri = uri.redacted()
        self._path = path

    @property
    def uri(self) -> str:
        return self._uri

    async def load(self) -> list[x509.Certificate]:
        try:
            data = await anyio.Path(self._path).read_bytes()
        except OSError as error:
            raise CertificateError(
                f"{self._uri}: cannot read {self._path}: {error.strerror}"
            ) from None
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as error:
            raise CertificateError(
                f"{self._uri}: {self._path} contains no PEM certificate: {error}"
            ) from None

    def watch_paths(self) -> Sequence[Path]:
        return (self._path,)


def create_key(arguments: argparse.Namespace) -> int:
    """Write a new P-256 key as NAME.key with mode 0600 (`kmsproxy keydir create`)."""
    directory: Path = (arguments.dir or default_directory()).expanduser()
    path = directory / f"{arguments.name}.key"
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: never overwrite a key, and never expose it with a wider mode.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(
            f"{path} already exists: choose another name or delete the file first"
        ) from None
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    uri = f"keydir:name={arguments.name}"
    if directory != default_directory():
        uri += f";dir={directory}"
    print(f"created {path}; use it as --clientkey '{uri}'")
    return 0
