"""Parsed `pkcs11:` URIs: the module, the token and the objects they select.

The attributes follow RFC 7512 in the form step-kms-plugin uses, for example
`pkcs11:module-path=softhsm2;token=dev;id=%01;object=client?pin-source=/run/pin`:

- `module-path`: the module's file, or a name from `modules.KNOWN_MODULES`;
- `token`, `serial`, `slot-id`: which token (label, serial number, or the
  module's decimal slot id). With none of them the module must have
  exactly one token;
- `id`, `object`: the object's CKA_ID (percent-encoded bytes) and CKA_LABEL;
- `pin-value`, `pin-source`: the user PIN, or a file whose first line is it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from kmsproxy.uri import KeyURI, is_secret_attribute, reject_unknown_attributes

SCHEME = "pkcs11"

# Attributes this backend reads; any other name is a typo worth reporting.
KNOWN_ATTRIBUTES = frozenset(
    {
        "module-path",
        "token",
        "serial",
        "slot-id",
        "id",
        "object",
        "type",
        "pin-value",
        "pin-source",
    }
)


@dataclass(frozen=True)
class TokenSelector:
    """The attributes that pick one token among a module's slots."""

    label: str | None = None
    serial: str | None = None
    slot_id: int | None = None
    # Set by backends whose module names tokens by a pattern, such as
    # ykcs11's "YubiKey PIV #<serial>".
    label_prefix: str | None = None

    def describe(self) -> str:
        """Return the selector as URI attributes, for messages."""
        parts = []
        if self.label is not None:
            parts.append(f"token={self.label}")
        if self.serial is not None:
            parts.append(f"serial={self.serial}")
        if self.slot_id is not None:
            parts.append(f"slot-id={self.slot_id}")
        if self.label_prefix is not None and self.label is None:
            parts.append(f"token label {self.label_prefix}*")
        return ";".join(parts) or "any token"


@dataclass(frozen=True)
class PinSource:
    """The source of the user PIN: a value, a file, or none.

    The repr never shows the value.
    """

    value: str | None = None
    path: Path | None = None

    @property
    def given(self) -> bool:
        return self.value is not None or self.path is not None

    def __repr__(self) -> str:
        if self.path is not None:
            return f"PinSource(path={self.path})"
        return "PinSource(value=***)" if self.value is not None else "PinSource()"


@dataclass(frozen=True)
class KeyAddress:
    """A parsed `pkcs11:` URI (or the same fields from another backend)."""

    uri: str
    module_path: str | None
    token: TokenSelector
    object_id: bytes | None
    label: str | None
    pin: PinSource

    def describe_object(self) -> str:
        """Return the object's selector as URI attributes, for messages."""
        parts = []
        if self.object_id is not None:
            parts.append(f"id={format_id(self.object_id)}")
        if self.label is not None:
            parts.append(f"object={self.label}")
        return ";".join(parts)


def quote_value(value: str, *, path: bool = False) -> str:
    """Percent-encode an attribute value for a printed URI (RFC 7512 2.3).

    Every character that `;`, `?`, `&`, `=` or `%` parsing could misread is
    encoded, and so is `'`, because listings wrap URIs in single quotes for
    the shell. With `path`, `/` stays readable in a module's file name.
    """
    return quote(value, safe="/" if path else "")


def format_id(object_id: bytes) -> str:
    """Percent-encode every byte of a CKA_ID, as RFC 7512 writes `id=`."""
    return "".join(f"%{byte:02X}" for byte in object_id)


def check_attributes(uri: KeyURI, known: frozenset[str]) -> None:
    """Raise `URIError` naming the attributes of `uri` not in `known`.

    The message shows no value of an unknown attribute, which may be a
    misspelt `pin-value`.
    """
    reject_unknown_attributes(uri, known)


def pin_source(uri: KeyURI) -> PinSource:
    """Read `pin-value=` or `pin-source=`; raise `ValueError` if both are given."""
    value = uri.get("pin-value")
    path_text = uri.get("pin-source")
    if value is not None and path_text is not None:
        raise ValueError(f"{uri.redacted()}: give pin-value or pin-source, not both")
    if path_text is None:
        return PinSource(value=value)
    # RFC 7512 writes pin-source as a URI (file:/path); a bare path works too.
    path = path_text.removeprefix("file://").removeprefix("file:")
    return PinSource(path=Path(path).expanduser())


def parse_key_uri(uri: KeyURI) -> KeyAddress:
    """Read a `pkcs11:` URI; raise `ValueError` naming a bad attribute."""
    check_attributes(uri, KNOWN_ATTRIBUTES)
    object_type = uri.get("type")
    if object_type not in (None, "private", "cert"):
        raise ValueError(
            f"{uri.redacted()}: type={object_type} is not supported; "
            "use type=private for a key or type=cert for a certificate"
        )
    slot_text = uri.get("slot-id")
    slot_id = None
    if slot_text is not None:
        if not slot_text.isdigit():
            raise ValueError(
                f"{uri.redacted()}: slot-id={slot_text} must be a decimal "
                "number (see `kmsproxy pkcs11 list`)"
            )
        slot_id = int(slot_text)

    object_id = _object_id(uri)
    address = KeyAddress(
        uri=redacted_uri(uri, object_id),
        module_path=uri.get("module-path"),
        token=TokenSelector(
            label=uri.get("token"), serial=uri.get("serial"), slot_id=slot_id
        ),
        object_id=object_id,
        label=uri.get("object"),
        pin=pin_source(uri),
    )

    if address.object_id is None and address.label is None:
        raise ValueError(
            f"{uri.redacted()}: name the object with id= or object= "
            "(see `kmsproxy pkcs11 list` for the URI of each key)"
        )
    return address


def redacted_uri(uri: KeyURI, object_id: bytes | None) -> str:
    """Return `uri.redacted()` with `id=` percent-encoded again.

    The decoded id is raw bytes, often unprintable (%01), so a message
    shows it the way the user wrote it.
    """
    parts = []
    for name, value in uri.attributes.items():
        if is_secret_attribute(name):
            value = "***"
        elif name == "id" and object_id is not None:
            value = format_id(object_id)
        parts.append(f"{name}={value}")
    return f"{uri.scheme}:" + ";".join(parts)


def _object_id(uri: KeyURI) -> bytes | None:
    """Return `id=` as bytes, decoded from the raw URI text.

    `KeyURI` decodes values as UTF-8 text, which would mangle an id byte
    such as %FF, so the raw attribute is percent-decoded again here.
    """
    if uri.get("id") is None:
        return None
    path = uri.raw.partition(":")[2].partition("?")[0]
    for part in path.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == "id":
            return unquote_to_bytes(value)
    # The URI was built in code rather than parsed: use its decoded text.
    return (uri.get("id") or "").encode()
