"""`kmsproxy init`: create the local CA and show how to trust it.

By default the CA key is a new EC P-256 key in `ca.key`. With `--key`, the
key stays in its backend (a TPM, a token, a cloud KMS, or a file), and only
`ca.crt` is written. `ca.sign_through_signer` makes its signature as
`LocalCA.sign` makes a leaf's: a throwaway key of the same algorithm encodes
the TBSCertificate, the CA key signs it through its `Signer`, and the
Certificate is assembled around that signature (RFC 5280 section 4.1). The
result is then verified against its own public key.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import stat
import tempfile
from pathlib import Path

import anyio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsproxy.ca import (
    ca_certificate_builder,
    choose_ca_scheme,
    create_ca_certificate,
    sign_through_signer,
)
from kmsproxy.cli.keys import open_signer_within, shown_key
from kmsproxy.cli.serve import (
    CA_CERTIFICATE_NAME,
    CA_KEY_NAME,
    CA_KEY_URI_NAME,
    config_directory,
)
from kmsproxy.errors import UserError
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import Signer, SignerError
from kmsproxy.uri import KeyURI, URIError, is_secret_attribute, looks_like_uri

DEFAULT_CA_NAME = "kmsproxy local CA"

# Maximum seconds the `--key` CA key may take to sign the CA certificate. A
# hardware key can wait for a touch or a PIN, so this leaves a person time
# to act, as `kmsproxy csr` does, and a hung device still ends the command.
CA_CERTIFICATE_SIGN_TIMEOUT_SECONDS = 120.0

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "init",
        help="create the local CA that signs the proxy's certificates",
        description=(
            f"Create an EC P-256 CA key ({CA_KEY_NAME}, mode 0600) and "
            f"certificate ({CA_CERTIFICATE_NAME}) in {config_directory()}. "
            f"With --key, write only {CA_CERTIFICATE_NAME}, signed by a key that "
            "stays in its backend."
        ),
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for ca.key and ca.crt (default: the config directory)",
    )
    parser.add_argument(
        "--key",
        metavar="KEY",
        default=None,
        help=(
            "an existing CA key, as a key URI such as tpmkms:name=ca or a file: "
            "sign ca.crt with it and write no ca.key"
        ),
    )
    parser.add_argument("--name", default=DEFAULT_CA_NAME, help="CA common name")
    parser.add_argument("--force", action="store_true", help="overwrite an existing CA")
    parser.set_defaults(handler=run)


# Mode of the directories init creates: the owner's only, as the XDG Base
# Directory Specification requires for its directories. Another user who can
# write to the CA's directory can rename ca.key and put their own in place.
PRIVATE_DIRECTORY_MODE = 0o700


def make_private_directory(directory: Path) -> None:
    """Create `directory` and its missing parents with mode 0700.

    `Path.mkdir(parents=True)` gives the parents the umask's mode, 0777
    under umask 000. An existing directory is left as it is, with a warning
    when other users can write to it.
    """
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(mode=PRIVATE_DIRECTORY_MODE, exist_ok=True)
    mode = directory.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        logger.warning(
            "The CA directory is writable by other users path=%s mode=%o; "
            "run chmod 700 on it",
            directory,
            stat.S_IMODE(mode),
        )


def create_ca(directory: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write a new CA key and certificate into `directory`; return both paths.

    Both files are written under temporary names and then renamed, so a
    failure while writing leaves the previous CA as it was. Raise
    `UserError` for an existing CA without `force`, and for any file system
    error.
    """
    key_path = directory / CA_KEY_NAME
    certificate_path = directory / CA_CERTIFICATE_NAME
    try:
        check_replaceable(directory, force=force)
        make_private_directory(directory)
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = create_ca_certificate(key, name)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
        new_key = _write_temporary(directory, key_pem, 0o600)
        try:
            new_certificate = _write_temporary(directory, certificate_pem, 0o644)
        except BaseException:
            new_key.unlink(missing_ok=True)
            raise
        # The key goes first: a crash between the renames leaves the old
        # certificate beside a new key, which `serve` rejects as mismatched.
        os.replace(new_key, key_path)
        os.replace(new_certificate, certificate_path)
        # A key URI left by `init --key` would name the old CA's key.
        (directory / CA_KEY_URI_NAME).unlink(missing_ok=True)
    except OSError as error:
        failed = error.filename or directory
        raise UserError(
            f"{failed}: cannot write the CA: {error.strerror or error}; choose "
            "another directory with --dir"
        ) from None
    return key_path, certificate_path


async def sign_ca_certificate(signer: Signer, name: str) -> x509.Certificate:
    """Sign a self-issued CA certificate for `signer`'s key, through `signer`.

    The certificate has the same content as one from `kmsproxy init`. Raise
    `SignerError` when the signer fails, takes longer than
    `CA_CERTIFICATE_SIGN_TIMEOUT_SECONDS`, or returns a signature that does
    not verify.
    """
    builder = ca_certificate_builder(signer.public_key(), name)
    scheme = choose_ca_scheme(signer)

    signed = await sign_through_signer(
        builder,
        signer,
        scheme,
        timeout_seconds=CA_CERTIFICATE_SIGN_TIMEOUT_SECONDS,
        role="the CA key",
    )
    certificate = x509.load_der_x509_certificate(signed)
    try:
        certificate.verify_directly_issued_by(certificate)
    except (InvalidSignature, ValueError, TypeError) as error:
        raise SignerError(
            f"{signer.uri}: the CA key produced a {scheme.name} signature that "
            f"does not verify ({error or 'bad signature'})"
        ) from error
    return certificate


async def create_certificate_for_key(
    registry: Registry, key: str, name: str
) -> x509.Certificate:
    """Open `key` through `registry`, sign its CA certificate, close it.

    Raise `SignerError` when the key does not open within
    `KEY_OPEN_TIMEOUT_SECONDS` or cannot sign.
    """
    signer = await open_signer_within(registry, key)
    try:
        return await sign_ca_certificate(signer, name)
    finally:
        await signer.aclose()


def write_ca_certificate(
    directory: Path,
    certificate: x509.Certificate,
    *,
    force: bool = False,
    keep_key: bool = False,
) -> Path:
    """Write `certificate` as `ca.crt` in `directory`; return its path.

    An existing `ca.key` or `ca.crt` needs `force`. With `force`, the new
    certificate replaces `ca.crt` and then the old `ca.key` is deleted, so
    that a later `kmsproxy serve` without positional arguments never pairs
    the old key with the new certificate. With `keep_key`, `ca.key` is the
    key that signed `certificate`, so it needs no `force` and stays, and a
    `ca.key-uri` is deleted. Raise `UserError` for an existing CA without
    `force`, and for any file system error.
    """
    key_path = directory / CA_KEY_NAME
    certificate_path = directory / CA_CERTIFICATE_NAME
    try:
        check_replaceable(directory, force=force, keep_key=keep_key)
        make_private_directory(directory)
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        os.replace(_write_temporary(directory, pem, 0o644), certificate_path)
        if not keep_key and key_path.exists():
            key_path.unlink()
            # The old key cannot be recovered, so say which file went.
            logger.warning("Deleted the previous CA key path=%s", key_path)
        if keep_key:
            (directory / CA_KEY_URI_NAME).unlink(missing_ok=True)
    except OSError as error:
        failed = error.filename or directory
        raise UserError(
            f"{failed}: cannot write the CA certificate: {error.strerror or error}; "
            "choose another directory with --dir"
        ) from None
    return certificate_path


def recordable_key(key: str) -> str | None:
    """Return `key` as `ca.key-uri` records it, or None if it has a secret.

    A path becomes absolute, so `serve` finds it from any directory. A URI
    is kept as given. A URI with a secret attribute (such as `pin-value=`)
    is not recorded, because the file would then contain the secret.

    NOTE: a relative `path=` or `pin-source=` inside a URI is kept as
    given, so `serve` resolves it against its own working directory.
    """
    path = Path(key).expanduser()
    if path.exists() or not looks_like_uri(key):
        return str(path.resolve())
    try:
        uri = KeyURI.parse(key)
    except URIError:
        return None
    if any(is_secret_attribute(name) for name in uri.attributes):
        return None
    return key


def write_key_uri(directory: Path, key: str | None) -> Path:
    """Write `key` into `ca.key-uri` in `directory`, or delete that file if
    `key` is None; return its path. Raise `UserError` for a file system error.
    """
    path = directory / CA_KEY_URI_NAME
    try:
        if key is None:
            path.unlink(missing_ok=True)
        else:
            data = f"{key}\n".encode()
            os.replace(_write_temporary(directory, data, 0o644), path)
    except OSError as error:
        raise UserError(
            f"{error.filename or path}: cannot write the CA key URI: "
            f"{error.strerror or error}; choose another directory with --dir"
        ) from None
    return path


def is_ca_key_file(key: str, directory: Path) -> bool:
    """Tell whether `key` names the file `ca.key` in `directory`.

    `key` may be a path or a URI with a `path=` attribute, such as
    `file:path=...` or `tpmkms:path=...`.
    """
    candidate = directory / CA_KEY_NAME
    path_text: str | None = key
    if not Path(key).expanduser().exists() and looks_like_uri(key):
        try:
            path_text = KeyURI.parse(key).get("path")
        except URIError:
            return False
    if path_text is None:
        return False
    try:
        return Path(path_text).expanduser().samefile(candidate)
    except OSError:
        return False


def serve_command(key: str, certificate_path: Path) -> str:
    """Return the `kmsproxy serve` line for a CA key given by `key`.

    A URI with a secret attribute appears redacted (see `shown_key`).
    """
    return (
        f"kmsproxy serve {shlex.quote(shown_key(key))} "
        f"{shlex.quote(str(certificate_path))} --clientkey KEY --clientcert CERT"
    )


def check_replaceable(directory: Path, *, force: bool, keep_key: bool = False) -> None:
    """Raise `UserError` if `directory` has a CA and `force` is not set.

    With `keep_key`, an existing `ca.key` does not count, because it is the
    key of the new CA.
    """
    names: tuple[str, ...] = (CA_CERTIFICATE_NAME,)
    if not keep_key:
        names = (CA_KEY_NAME, CA_CERTIFICATE_NAME, CA_KEY_URI_NAME)
    for existing in (directory / name for name in names):
        if existing.exists() and not force:
            raise UserError(
                f"{existing} already exists; pass --force to replace the CA "
                "(clients that trust the old CA must then trust the new one)"
            )


def _write_temporary(directory: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a new file in `directory` with `mode`; return its path."""
    # mkstemp creates the file with mode 0600, before any data is written.
    descriptor, name = tempfile.mkstemp(prefix=".kmsproxy-init-", dir=directory)
    path = Path(name)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return path


def trust_instructions(certificate_path: Path) -> str:
    """Return the commands that add the CA to each platform's trust store."""
    path = str(certificate_path)
    return f"""\
Trust this CA so that clients accept the proxy's certificates:

  Debian, Ubuntu:
    sudo cp {path} /usr/local/share/ca-certificates/kmsproxy.crt
    sudo update-ca-certificates
  Fedora, RHEL, Arch (p11-kit):
    sudo trust anchor --store {path}
  macOS:
    sudo security add-trusted-cert -d -r trustRoot \\
      -k /Library/Keychains/System.keychain {path}
  Windows (PowerShell as administrator):
    certutil -addstore -f ROOT {path}

Tools with their own store need it too, e.g. curl --cacert {path}.
"""


# Length limits of a commonName: RFC 5280 appendix A, ub-common-name.
MIN_COMMON_NAME_LENGTH = 1
MAX_COMMON_NAME_LENGTH = 64


def check_common_name(name: str) -> None:
    """Raise `UserError` for a --name that X.509 cannot encode as a CN."""
    if not MIN_COMMON_NAME_LENGTH <= len(name) <= MAX_COMMON_NAME_LENGTH:
        raise UserError(
            f"--name has {len(name)} characters: a certificate's common name "
            f"takes {MIN_COMMON_NAME_LENGTH} to {MAX_COMMON_NAME_LENGTH} "
            "(RFC 5280 ub-common-name); choose a shorter or non-empty name"
        )


def run(args: argparse.Namespace) -> int:
    check_common_name(args.name)
    directory = args.dir or config_directory()
    if args.key is None:
        key_path, certificate_path = create_ca(directory, args.name, force=args.force)
        print(f"Created {key_path} and {certificate_path}.\n")
        print(trust_instructions(certificate_path), end="")
        return 0
    return _run_with_key(args, directory)


def _run_with_key(args: argparse.Namespace, directory: Path) -> int:
    """Write `ca.crt` signed by `--key`; print how to trust it and serve."""
    registry = Registry.load()
    # `--key` may be the directory's own ca.key, to re-sign ca.crt with it.
    keep_key = is_ca_key_file(args.key, directory)
    # Checked before the key signs, so no touch or PIN is wasted.
    check_replaceable(directory, force=args.force, keep_key=keep_key)
    certificate = anyio.run(create_certificate_for_key, registry, args.key, args.name)
    certificate_path = write_ca_certificate(
        directory, certificate, force=args.force, keep_key=keep_key
    )

    print(f"Created {certificate_path}, signed by the CA key {shown_key(args.key)}.\n")
    print(trust_instructions(certificate_path))

    # ca.key-uri lets a later `serve` without CAKEY CACERT find the key.
    recorded = None if keep_key else recordable_key(args.key)
    if not keep_key:
        key_uri_path = write_key_uri(directory, recorded)
        if recorded is not None:
            print(f"Recorded the CA key in {key_uri_path}.")
    if recorded is not None and directory == config_directory():
        print("Run the proxy with:\n")
        print("  kmsproxy serve --clientkey KEY --clientcert CERT\n")
        print("or name the CA key and certificate:\n")
    else:
        print("Run the proxy with this CA key and certificate:\n")

    print(f"  {serve_command(args.key, certificate_path)}")
    if shown_key(args.key) != args.key:
        print(
            f"\nThe key's secret is shown as *** and not recorded in "
            f"{CA_KEY_URI_NAME}; give it with pin-source=FILE."
        )
    return 0
