"""`kmsproxy yubikey list`: each YubiKey's PIV slots with key and certificate.

For every slot that contains a key or a certificate, one line gives the key
type, the certificate's subject and expiry, and the URI to use.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import pkcs11
from cryptography import x509
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from kmsproxy.errors import UserError
from kmsproxy_pkcs11.address import TokenSelector, quote_value
from kmsproxy_pkcs11.modules import (
    Module,
    ModuleError,
    load_module,
    resolve_module_path,
)
from kmsproxy_pkcs11.objects import attribute_or_none
from kmsproxy_pkcs11.token import TOKEN_GONE_ERRORS, return_value_name

from .address import YKCS11, default_module, not_found_hint
from .slots import PIV_SLOTS, YUBIKEY_LABEL_PREFIX, PivSlot


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "yubikey", help="inspect YubiKey PIV slots (kmsproxy-yubikey)"
    )
    commands = parser.add_subparsers(title="commands", required=True)
    listing = commands.add_parser(
        "list", help="list PIV slots with certificate subject, expiry and URI"
    )
    listing.add_argument(
        "--module-path",
        metavar="MODULE",
        help=f"the ykcs11 module's file (default: {YKCS11} where it is installed)",
    )
    listing.add_argument(
        "--serial", help="list only the YubiKey with this serial number"
    )
    listing.set_defaults(handler=run_list)


def run_list(arguments: argparse.Namespace) -> int:
    """Print the PIV slots of every YubiKey found (`kmsproxy yubikey list`)."""
    module_text = arguments.module_path or default_module()
    try:
        module = load_module(resolve_module_path(module_text, "--module-path"))
    except ModuleError as error:
        raise UserError(f"{error}") from None
    selector = TokenSelector(
        label=f"{YUBIKEY_LABEL_PREFIX}{arguments.serial}" if arguments.serial else None,
        label_prefix=None if arguments.serial else YUBIKEY_LABEL_PREFIX,
    )
    tokens = list(_yubikeys(module, selector))
    if not tokens:
        expected = f"YubiKey {arguments.serial}" if arguments.serial else "YubiKey"
        raise UserError(
            f"no YubiKey found: module {module.path} lists no {expected}; "
            f"{not_found_hint('--serial')}"
        )
    for token in tokens:
        for line in _list_token(token, module_text if arguments.module_path else None):
            print(line)
    return 0


def _yubikeys(module: Module, selector: TokenSelector) -> Iterator[Any]:
    try:
        slots = module.library.get_slots(token_present=True)
    except TOKEN_GONE_ERRORS as error:
        # The same words as the pkcs11 backend's TokenMissing, which the
        # other commands print, so that both read alike.
        raise UserError(
            f"no YubiKey found: module {module.path} lists no slots "
            f"({return_value_name(error)}); {not_found_hint('--serial')}"
        ) from None
    for slot in slots:
        try:
            token = slot.get_token()
        except TOKEN_GONE_ERRORS:
            continue
        if selector.label is not None and token.label != selector.label:
            continue
        if selector.label_prefix and not token.label.startswith(selector.label_prefix):
            continue
        yield token


def _list_token(token: Any, module_path: str | None) -> Iterator[str]:
    serial = token.label.removeprefix(YUBIKEY_LABEL_PREFIX)
    yield f"YubiKey {serial} ({token.model or 'unknown model'})"
    try:
        session = token.open()
    except p11.PKCS11Error as error:
        # Pulled out between the slot scan and here, or held by another
        # program (GnuPG's scdaemon, for one).
        yield f"  cannot open a session: {return_value_name(error)}"
        return
    with session:
        found = False
        for slot in PIV_SLOTS.values():
            line = _describe_slot(session, slot)
            if line is None:
                continue
            found = True
            uri = f"yubikey:slot-id={slot.hex};serial={serial}"
            if module_path is not None:
                uri += f";module-path={quote_value(module_path, path=True)}"
            yield f"  slot {slot.hex} ({slot.name}): {line}"
            yield f"    '{uri}'"
        if not found:
            yield "  no slot holds a key or certificate"


def _describe_slot(session: pkcs11.Session, slot: PivSlot) -> str | None:
    object_id = bytes([slot.object_id])
    key = _first(session, ObjectClass.PUBLIC_KEY, object_id)
    certificate = _first(session, ObjectClass.CERTIFICATE, object_id)
    if key is None and certificate is None:
        return None
    parts = [f"key {_key_type(key)}" if key is not None else "no public key object"]
    value = attribute_or_none(certificate, Attribute.VALUE) if certificate else None
    if value:
        try:
            loaded = x509.load_der_x509_certificate(value)
        except ValueError:
            parts.append("certificate not X.509")
        else:
            parts.append(f"certificate subject={loaded.subject.rfc4514_string()}")
            parts.append(f"expires={loaded.not_valid_after_utc.isoformat()}")
    else:
        parts.append("no certificate")
    return ", ".join(parts)


def _first(session: pkcs11.Session, object_class: ObjectClass, object_id: bytes) -> Any:
    try:
        for obj in session.get_objects(
            {Attribute.CLASS: object_class, Attribute.ID: object_id}
        ):
            return obj
    except p11.PKCS11Error:
        return None
    return None


def _key_type(key: Any) -> str:
    if key.key_type == KeyType.RSA:
        modulus = attribute_or_none(key, Attribute.MODULUS)
        return f"RSA-{len(modulus) * 8}" if modulus else "RSA"
    if key.key_type == KeyType.EC:
        return "EC"
    return str(key.key_type)
