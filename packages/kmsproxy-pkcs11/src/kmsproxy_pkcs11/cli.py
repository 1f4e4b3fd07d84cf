"""`kmsproxy pkcs11 list`: tokens, keys, certificates and mechanisms.

Each key and certificate is printed with the URI that names it, ready for
`--clientkey` and `--clientcert`. Without `--module-path`, every module in
`modules.KNOWN_MODULES` found on this machine is listed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
from cryptography import x509
from pkcs11 import Attribute, KeyType, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11

from kmsproxy.errors import UserError
from kmsproxy.signer import SignerError

from .address import PinSource, format_id, quote_value
from .mechanisms import SIGNING_MECHANISMS, mechanism_names
from .modules import (
    KNOWN_MODULES,
    ModuleError,
    find_known_module,
    load_module,
    resolve_module_path,
)
from .objects import attribute_or_none
from .pin import read_pin
from .token import attribute_mapper, describe_token, return_value_name


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "pkcs11", help="inspect PKCS#11 tokens (kmsproxy-pkcs11)"
    )
    commands = parser.add_subparsers(title="commands", required=True)
    listing = commands.add_parser(
        "list",
        help="list tokens, keys, certificates and mechanisms with their URIs",
    )
    listing.add_argument(
        "--module-path",
        metavar="MODULE",
        help=(
            "the PKCS#11 module's file, or one of "
            f"{', '.join(KNOWN_MODULES)} (default: every one installed)"
        ),
    )
    listing.add_argument(
        "--pin-source",
        type=Path,
        metavar="FILE",
        help=(
            "file whose first line is the user PIN; needed to list private "
            "keys on tokens that hide them before login"
        ),
    )
    listing.set_defaults(handler=run_list)


def run_list(arguments: argparse.Namespace) -> int:
    """Print every token of the chosen modules (`kmsproxy pkcs11 list`)."""
    pin = PinSource(path=arguments.pin_source) if arguments.pin_source else PinSource()
    if arguments.module_path:
        try:
            paths = [resolve_module_path(arguments.module_path, "--module-path")]
        except ModuleError as error:
            raise UserError(str(error)) from None
    else:
        paths = [p for p in map(find_known_module, KNOWN_MODULES) if p is not None]
        if not paths:
            raise UserError(
                "no known PKCS#11 module is installed; give its file with --module-path"
            )
    for path in paths:
        for line in list_module(path, pin):
            print(line)
    return 0


def list_module(path: Path, pin: PinSource) -> Iterator[str]:
    """Yield the lines that describe module `path` and its tokens."""
    try:
        module = load_module(path)
    except ModuleError as error:
        yield f"module {path}: {error}"
        return
    library = module.library
    yield f"module {path} ({library.manufacturer_id}, {library.library_description})"
    try:
        slots = library.get_slots(token_present=True)
    except p11.PKCS11Error as error:
        yield f"  no slots ({return_value_name(error)})"
        return
    tokens = []
    for slot in slots:
        try:
            token = slot.get_token()
        except (p11.TokenNotPresent, p11.TokenNotRecognised):
            continue
        if token.flags & TokenFlag.TOKEN_INITIALIZED:
            tokens.append(token)
    if not tokens:
        yield "  no initialised token"
    for token in tokens:
        yield from _list_token(path, token, pin)


def _list_token(path: Path, token: Any, pin: PinSource) -> Iterator[str]:
    base = (
        f"pkcs11:module-path={quote_value(str(path), path=True)};"
        f"token={quote_value(token.label)}"
    )
    flags = token.flags
    login = " login-required" if flags & TokenFlag.LOGIN_REQUIRED else ""
    yield f"  {describe_token(token)} slot-id={token.slot.slot_id}{login}"
    mechanisms = token.slot.get_mechanisms() & SIGNING_MECHANISMS
    yield f"    mechanisms: {', '.join(mechanism_names(mechanisms)) or 'none'}"
    try:
        pin_text = read_pin(pin, base)
    except SignerError as error:
        raise UserError(str(error)) from None
    try:
        session = _open(token, pin_text)
    except p11.PKCS11Error as error:
        yield f"    cannot open a session: {return_value_name(error)}"
        return
    try:
        yield from _list_objects(session, base, logged_in=pin_text is not None)
    finally:
        session.close()
    if flags & TokenFlag.LOGIN_REQUIRED:
        if pin_text is None:
            yield "    (private keys are hidden until login: add --pin-source FILE)"
        elif pin.path is not None:
            # The URIs above name no PIN, and signing needs one.
            source = quote_value(os.path.abspath(pin.path), path=True)
            yield f"    (append ?pin-source={source} to a key URI above to sign)"


def _open(token: Any, pin: str | None) -> pkcs11.Session:
    try:
        session: pkcs11.Session = token.open(
            user_pin=pin, attribute_mapper=attribute_mapper()
        )
    except p11.PinIncorrect:
        raise UserError(
            f"wrong PIN for {describe_token(token)}; check --pin-source "
            "(kmsproxy never retries a wrong PIN)"
        ) from None
    except p11.UserAlreadyLoggedIn:
        session = token.open(attribute_mapper=attribute_mapper())
    return session


def _list_objects(session: pkcs11.Session, base: str, logged_in: bool) -> Iterator[str]:
    private_ids = set()
    for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
        object_id = attribute_or_none(key, Attribute.ID) or b""
        private_ids.add(object_id)
        yield f"    private key {_key_description(key)}"
        yield f"      {_object_uri(base, object_id, _label(key))}"
    for key in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}):
        object_id = attribute_or_none(key, Attribute.ID) or b""
        if object_id in private_ids:
            continue
        yield f"    public key {_key_description(key)}"
        yield f"      {_object_uri(base, object_id, _label(key))}"
    for certificate in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}):
        object_id = attribute_or_none(certificate, Attribute.ID) or b""
        yield f"    certificate {_certificate_description(certificate, object_id)}"
        yield f"      {_object_uri(base, object_id, _label(certificate))}"


def _key_description(key: Any) -> str:
    object_id = attribute_or_none(key, Attribute.ID) or b""
    label = attribute_or_none(key, Attribute.LABEL) or ""
    detail = ""
    if key.key_type == KeyType.RSA:
        modulus = attribute_or_none(key, Attribute.MODULUS)
        detail = f"RSA-{len(modulus) * 8}" if modulus else "RSA"
    elif key.key_type == KeyType.EC:
        detail = "EC"
    allowed = attribute_or_none(key, Attribute.ALLOWED_MECHANISMS)
    limit = f" allowed={','.join(mechanism_names(allowed))}" if allowed else ""
    return f"id={format_id(object_id)} object={label!r} {detail}{limit}"


def _certificate_description(certificate: Any, object_id: bytes) -> str:
    label = attribute_or_none(certificate, Attribute.LABEL) or ""
    value = attribute_or_none(certificate, Attribute.VALUE)
    text = f"id={format_id(object_id)} object={label!r}"
    try:
        loaded = x509.load_der_x509_certificate(value)
    except (TypeError, ValueError):
        return f"{text} (not an X.509 certificate)"
    return (
        f"{text} subject={loaded.subject.rfc4514_string()} "
        f"expires={loaded.not_valid_after_utc.isoformat()}"
    )


def _label(obj: Any) -> str:
    label = attribute_or_none(obj, Attribute.LABEL)
    return label if isinstance(label, str) else ""


def _object_uri(base: str, object_id: bytes, label: str) -> str:
    uri = base
    if object_id:
        uri += f";id={format_id(object_id)}"
    if label:
        uri += f";object={quote_value(label)}"
    return f"'{uri}'"
