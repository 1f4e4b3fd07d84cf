"""Opening a `KeyAddress`: its module, its token, then the key or chain.

The yubikey backend builds a `KeyAddress` from a PIV slot and opens it
through these same functions.
"""

from __future__ import annotations

from pathlib import Path

from pkcs11 import exceptions as p11

from kmsproxy.signer import SignerError

from .address import KeyAddress
from .certificates import MissingExplainer, TokenCertificateSource
from .modules import (
    KNOWN_MODULES,
    Module,
    ModuleError,
    find_known_module,
    load_module,
    resolve_module_path,
)
from .signer import Pkcs11Signer
from .token import acquire_token, release_token, return_value_name, with_uri


def module_for(address: KeyAddress) -> Module:
    """Load the module `address` names; raise `SignerError` naming the fix."""
    if not address.module_path:
        raise SignerError(
            f"{address.uri}: missing module-path=; give the PKCS#11 module's "
            f"file or one of its known names ({installed_modules_hint()})"
        )
    try:
        return load_module(resolve_module_path(address.module_path))
    except ModuleError as error:
        raise SignerError(f"{address.uri}: {error}") from None


def installed_modules_hint() -> str:
    """Name each known module, with its path where it is installed here."""
    parts = []
    for name in KNOWN_MODULES:
        found: Path | None = find_known_module(name)
        parts.append(f"{name} at {found}" if found else f"{name} (not found)")
    return ", ".join(parts)


def open_signer(address: KeyAddress) -> Pkcs11Signer:
    """Open the private key `address` names, sharing its token's session."""
    module = module_for(address)
    try:
        token = acquire_token(module, address.token, address.pin, address.uri)
    except SignerError as error:
        # Keep the class (TokenMissing) so a caller can explain the absence.
        raise type(error)(with_uri(address.uri, error)) from None
    try:
        return Pkcs11Signer(address, token)
    except p11.PKCS11Error as error:
        release_token(token)
        raise SignerError(
            f"{address.uri}: reading the key failed: {return_value_name(error)}"
        ) from None
    except BaseException:
        release_token(token)
        raise


def open_certificates(
    address: KeyAddress, explain_missing: MissingExplainer | None = None
) -> TokenCertificateSource:
    """Return the certificate source for `address` (read at each load)."""
    return TokenCertificateSource(address, module_for(address), explain_missing)
