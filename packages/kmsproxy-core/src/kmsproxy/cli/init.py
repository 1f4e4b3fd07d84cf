"""`kmsproxy init`: create the local CA and show how to trust it."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsproxy.ca import create_ca_certificate
from kmsproxy.cli.serve import CA_CERTIFICATE_NAME, CA_KEY_NAME, config_directory
from kmsproxy.errors import UserError

DEFAULT_CA_NAME = "kmsproxy local CA"


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "init",
        help="create the local CA that signs the proxy's certificates",
        description=(
            f"Create an EC P-256 CA key ({CA_KEY_NAME}, mode 0600) and "
            f"certificate ({CA_CERTIFICATE_NAME}) in {config_directory()}."
        ),
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for ca.key and ca.crt (default: the config directory)",
    )
    parser.add_argument("--name", default=DEFAULT_CA_NAME, help="CA common name")
    parser.add_argument("--force", action="store_true", help="overwrite an existing CA")
    parser.set_defaults(handler=run)


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
        existing = [p for p in (key_path, certificate_path) if p.exists()]
        if existing and not force:
            raise UserError(
                f"{existing[0]} already exists; pass --force to replace the CA "
                "(clients that trust the old CA must then trust the new one)"
            )
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    except OSError as error:
        failed = error.filename or directory
        raise UserError(
            f"{failed}: cannot write the CA: {error.strerror or error}; choose "
            "another directory with --dir"
        ) from None
    return key_path, certificate_path


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


def run(args: argparse.Namespace) -> int:
    directory = args.dir or config_directory()
    key_path, certificate_path = create_ca(directory, args.name, force=args.force)
    print(f"Created {key_path} and {certificate_path}.\n")
    print(trust_instructions(certificate_path), end="")
    return 0
