"""`kmsproxy tpm ...`: create, list and delete TPM keys, store their chains.

A CA certificate for a CA key in the TPM comes from the core command
`kmsproxy init --key tpmkms:name=NAME`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPMS_ECC_PARMS,
    TPMS_RSA_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_PUBLIC_PARMS,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
)

from kmsproxy.certificates import CertificateError
from kmsproxy.errors import UserError
from kmsproxy.files import read_file_head
from kmsproxy.plugins.file import load_certificates
from kmsproxy.signer import SignerError
from kmsproxy_tpm import storage
from kmsproxy_tpm.device import (
    OPTION_SYNTAX,
    TPMError,
    TPMUnavailable,
    describe_tss_error,
    open_context,
)
from kmsproxy_tpm.keyblob import (
    CURVE_IDS,
    KeyFileError,
    blob_from_key,
    read_key_file,
)
from kmsproxy_tpm.reference import (
    DEFAULT_DEVICE,
    SCHEME,
    TCTI_VARIABLE,
    default_tcti,
    read_auth_file,
    tcti_for_device,
)

KEY_TYPES = ("EC", "RSA")
CURVES = tuple(CURVE_IDS)
RSA_SIZES = (2048, 3072)

# Shown by `kmsproxy tpm list` after the type of a key with an auth value.
AUTH_MARK = "auth value"

# Attributes of a new key. It signs only: without decrypt, a TLS client key
# cannot also do raw RSA decryption. It never leaves this TPM, takes its auth
# value in a password session, and is exempt from dictionary-attack lockout
# (noda), as tpm2-openssl's keys are.
NEW_KEY_ATTRIBUTES = (
    TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "tpm",
        help="manage TPM 2.0 keys (tpmkms: URIs)",
        description=(
            f"Keys are TSS2 PRIVATE KEY files in {storage.key_directory()}, "
            "wrapped by this machine's TPM; name one in a key URI as "
            "tpmkms:name=NAME."
        ),
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    create = commands.add_parser("create", help="create a signing key in the TPM")
    create.add_argument(
        "name", metavar="NAME", help="key name, used as tpmkms:name=NAME"
    )
    create.add_argument(
        "--kty", choices=KEY_TYPES, default="EC", help="key type (default EC)"
    )
    create.add_argument(
        "--curve", choices=CURVES, default="P-256", help="EC curve (default P-256)"
    )
    create.add_argument(
        "--size",
        type=int,
        choices=RSA_SIZES,
        default=2048,
        help="RSA modulus size in bits (default 2048)",
    )
    create.add_argument(
        "--pin-source",
        type=Path,
        metavar="FILE",
        help="file whose first line becomes the key's auth value (default none)",
    )
    _add_tpm_arguments(create)
    create.set_defaults(handler=run_create)

    listing = commands.add_parser(
        "list",
        help="list the keys in the key directory",
        description=(
            "Print one line per key: name, type, certificate and URI, "
            "separated by tabs. --device or --tcti goes into each URI."
        ),
    )
    _add_tpm_arguments(listing)
    listing.set_defaults(handler=run_list)

    delete = commands.add_parser("delete", help="delete a key and its chain")
    delete.add_argument("name", metavar="NAME", help="key name")
    delete.set_defaults(handler=run_delete)

    import_cert = commands.add_parser(
        "import-cert", help="store a certificate chain beside a key"
    )
    import_cert.add_argument("name", metavar="NAME", help="key name")
    import_cert.add_argument(
        "file", metavar="FILE", type=Path, help="PEM chain, leaf first"
    )
    import_cert.set_defaults(handler=run_import_cert)


def _add_tpm_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--device",
        metavar="PATH",
        help=f"TPM character device (default {DEFAULT_DEVICE})",
    )
    where.add_argument(
        "--tcti",
        metavar="TCTI",
        help=(
            "tpm2-tss TCTI string, e.g. swtpm:host=127.0.0.1,port=2321 "
            f"(default ${TCTI_VARIABLE} when set)"
        ),
    )


def _key_path(name: str) -> Path:
    try:
        return storage.key_path_for(name)
    except ValueError as error:
        raise UserError(str(error)) from None


def _uri_for(name: str, args: argparse.Namespace) -> str:
    """Return the key URI for `name` with the TPM options given."""
    uri = f"{SCHEME}:name={name}"
    if args.tcti:
        uri += f";tcti={args.tcti}"
    elif args.device:
        uri += f";device={args.device}"
    if getattr(args, "pin_source", None):
        uri += f";pin-source={args.pin_source}"
    return uri


def _key_parameters(args: argparse.Namespace) -> Any:
    """Return the TPMT_PUBLIC_PARMS that TPM2_TestParms checks before creation."""
    if args.kty == "RSA":
        return TPMT_PUBLIC_PARMS(
            type=TPM2_ALG.RSA,
            parameters=TPMU_PUBLIC_PARMS(
                rsaDetail=TPMS_RSA_PARMS(
                    symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                    scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                    keyBits=args.size,
                    exponent=0,
                )
            ),
        )
    return TPMT_PUBLIC_PARMS(
        type=TPM2_ALG.ECC,
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=CURVE_IDS[args.curve],
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            )
        ),
    )


def run_create(args: argparse.Namespace) -> int:
    """Create a key in the TPM and write its TSS2 PEM with mode 0600."""
    path = _key_path(args.name)
    if path.exists():
        raise UserError(
            f"{path} already exists: choose another name, or remove it with "
            f"`kmsproxy tpm delete {args.name}`"
        )
    tcti = args.tcti or (
        tcti_for_device(args.device) if args.device else default_tcti()
    )
    key = _create_in_tpm(args, tcti, _read_new_auth(args.pin_source))
    blob = blob_from_key(key, args.name)

    try:
        storage.write_new_key(path, blob.to_pem())
    except FileExistsError:
        raise UserError(f"{path} was created meanwhile by another program") from None
    uri = _uri_for(args.name, args)
    print(f"created {blob.description} key {path}")
    print(
        f"use it as --clientkey '{uri}', or as the local CA's key with "
        f"`kmsproxy init --key '{uri}'`"
    )
    return 0


def _read_new_auth(pin_source: Path | None) -> bytes | None:
    """Return the auth value for a new key from `--pin-source`, if given."""
    if pin_source is None:
        return None
    try:
        auth = read_auth_file(pin_source, "--pin-source")
    except SignerError as error:
        raise UserError(str(error)) from None
    if not auth:
        raise UserError(f"--pin-source {pin_source}: the first line is empty")
    return auth


def _create_in_tpm(args: argparse.Namespace, tcti: str, auth: bytes | None) -> Any:
    """Check the key type with TPM2_TestParms, then create the key under the SRK."""
    key_type = f"RSA {args.size}" if args.kty == "RSA" else f"EC {args.curve}"
    try:
        esapi = open_context(tcti)
    except TPMError as error:
        raise UserError(f"tpm create {args.name}: {error}") from None
    with esapi:
        try:
            esapi.test_parms(_key_parameters(args))
        except TSS2_Exception as error:
            described = describe_tss_error(error, tcti, OPTION_SYNTAX)
            if isinstance(described, TPMUnavailable):
                raise UserError(f"tpm create {args.name}: {described}") from None
            raise UserError(
                f"the TPM at {tcti} does not support {key_type} keys ({error}); "
                "try --kty EC --curve P-256"
            ) from None

        # TSSPrivKey.create flushes the primary key it makes, on errors too.
        try:
            return TSSPrivKey.create(esapi, _key_template(args), password=auth)
        except TSS2_Exception as error:
            message = describe_tss_error(error, tcti, OPTION_SYNTAX)
            raise UserError(f"tpm create {args.name}: {message}") from None


def _key_template(args: argparse.Namespace) -> Any:
    """Return the TPMT_PUBLIC of a new signing key with the NULL scheme.

    The NULL scheme lets each TPM2_Sign choose the scheme and hash, so an
    RSA key signs with both RSA-PSS and PKCS#1 v1.5.
    """
    parameters = _key_parameters(args)
    return TPMT_PUBLIC(
        type=parameters.type,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=NEW_KEY_ATTRIBUTES,
        authPolicy=b"",
        parameters=parameters.parameters,
    )


def run_list(args: argparse.Namespace) -> int:
    """Print one line per key: name, type, certificate, URI (tab-separated).

    A key with an auth value is typed `..., auth value`: its URI needs
    pin-source= or pin-value= as well, which the key file does not name.
    """
    names = storage.key_names()
    if not names:
        print(
            f"no keys in {storage.key_directory()}; create one with "
            "`kmsproxy tpm create NAME`",
            file=sys.stderr,
        )
    any_auth = False
    for name in names:
        path = storage.key_path_for(name)
        try:
            blob = read_key_file(path)
        except KeyFileError as error:
            description = f"unreadable ({error})"
        else:
            description = blob.description
            if blob.needs_auth:
                description += f", {AUTH_MARK}"
                any_auth = True
        uri = _uri_for(name, args)
        print(f"{name}\t{description}\t{_chain_summary(path)}\t{uri}")
    if any_auth:
        print(
            f"keys marked '{AUTH_MARK}' need ;pin-source=FILE (or ;pin-value=) "
            "added to their URI",
            file=sys.stderr,
        )
    return 0


def _chain_summary(key_path: Path) -> str:
    chain_path = storage.chain_path_for(key_path)
    if not chain_path.exists():
        return "no certificate"
    try:
        leaf = load_certificates(chain_path)[0]
    except Exception as error:
        return f"unreadable certificate ({error})"
    expiry = leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{leaf.subject.rfc4514_string()} until {expiry}"


def run_delete(args: argparse.Namespace) -> int:
    """Delete a key file and its chain; the key is gone for good."""
    path = _key_path(args.name)
    if not path.exists():
        raise UserError(
            f"no key named {args.name!r} in {storage.key_directory()} "
            "(`kmsproxy tpm list` shows the keys)"
        )
    path.unlink()
    chain = storage.chain_path_for(path)
    chain.unlink(missing_ok=True)
    print(f"deleted {path}")
    return 0


def run_import_cert(args: argparse.Namespace) -> int:
    """Store a chain beside a key after checking that the leaf certifies it."""
    path = _key_path(args.name)
    try:
        blob = read_key_file(path)
    except KeyFileError as error:
        raise UserError(f"{error} (`kmsproxy tpm list` shows the keys)") from None
    chain = _load_chain(Path(args.file))
    if chain[0].public_key() != blob.public_key:
        raise UserError(
            f"{args.file}: the first certificate "
            f"({chain[0].subject.rfc4514_string()}) is not for the key "
            f"{args.name}; put the leaf for this key first"
        )
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    target = storage.chain_path_for(path)
    storage.replace_chain(target, pem)
    print(f"stored {len(chain)} certificate(s) in {target}")
    return 0


# Bytes read from a file that is not a certificate chain, to tell a private
# key from other input: a PEM header line fits well within them.
FILE_HEAD_BYTES = 4096


def _load_chain(path: Path) -> list[x509.Certificate]:
    """Read a certificate chain for `import-cert`, naming a key given instead."""
    try:
        return load_certificates(path)
    except CertificateError as error:
        try:
            head = read_file_head(path, FILE_HEAD_BYTES)
        except OSError:
            raise error from None
        if b"PRIVATE KEY-----" not in head:
            raise
    raise UserError(
        f"{path}: no certificate found (it looks like a private key); "
        "give the certificate chain, leaf first"
    )
