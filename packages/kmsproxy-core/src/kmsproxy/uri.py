"""Key and certificate URIs in step-kms-plugin's form.

`scheme:name=value;name=value?name=value`, for example
`tpmkms:name=mykey`, `yubikey:slot-id=9a?pin-value=123456` or
`pkcs11:token=dev;id=%01;object=client?pin-source=/run/pin`. Values are
percent-decoded (RFC 3986 section 2.1), as RFC 7512 requires for `pkcs11:`.
Both the path part and the query part become attributes; a name given twice
is an error, so a typo cannot silently shadow a value.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from urllib.parse import unquote

from kmsproxy.errors import UserError

# Attributes whose values are secrets: never logged, never in an error message.
SECRET_ATTRIBUTES = frozenset(
    {"pin-value", "pin", "password", "secret", "auth", "token-value"}
)

# A name that contains one of these is treated as a secret too, so a
# backend's own spelling (`session-token`, `secret-access-key`) is redacted
# without being listed above. A bare `token` is not a secret: in RFC 7512
# (`pkcs11:`) it is the token label, which an error must be able to name.
# Only a name that joins "token" to another word is caught.
SECRET_NAME_PARTS = (
    "pin",
    "pass",
    "secret",
    "-token",
    "token-",
    "_token",
    "token_",
    "key-value",
    "credential",
)

# Suffixes of attributes that name where a secret is kept (a file path or a
# source such as `pin-source=/run/pin`), not the secret itself. They stay
# readable so that an error can name the file to fix.
SECRET_LOCATION_SUFFIXES = ("-file", "-source")

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")
# A Windows drive letter ("C:\\keys\\a.pem") is a path, not a URI scheme.
_DRIVE = re.compile(r"^[a-zA-Z]:[\\/]")


# Appended to errors about a malformed or unknown attribute, because the
# usual cause is a value (often a PIN) that contains a separator.
ENCODING_HINT = "percent-encode ; ? & and % inside a value as %3B, %3F, %26 and %25"


class URIError(ValueError, UserError):
    """A key or certificate URI is malformed; the message names it, redacted.

    It is a `ValueError`, which a backend hook may raise for a URI it cannot
    use, and a `UserError`, which callers of the registry catch for bad input.
    """


@dataclass(frozen=True)
class KeyURI:
    """A parsed step-kms-plugin style URI."""

    scheme: str
    attributes: dict[str, str] = field(default_factory=dict)
    raw: str = ""

    @classmethod
    def parse(cls, text: str) -> KeyURI:
        """Parse `text`; raise `URIError` naming the malformed attribute.

        An error names an attribute by its position, not its text, when the
        attribute has no `=` or comes after a secret attribute. A secret that
        contains an unencoded `;`, `?` or `&` continues past the separator,
        and a part without `=` may be a secret typed without its name. A
        query part that contains `;` (RFC 7512 allows none there) and a value
        that contains `&pin-value=` or another secret's name after `&` or `?`
        are rejected, because the next secret would be read as part of it.
        """
        match = _SCHEME.match(text)
        if match is None or _DRIVE.match(text):
            # Text without a scheme has no attributes to hide, only secrets.
            shown = redact_text(text, hide_bare_parts=False)
            raise URIError(f"{shown!r} is not a URI of the form scheme:name=value")
        scheme = match.group(1).lower()
        path_parts, query_parts = _split_attributes(text[match.end() :])
        parts = path_parts + query_parts
        attributes: dict[str, str] = {}
        first_secret: str | None = None
        for index, part in enumerate(parts, start=1):
            name, sep, value = part.partition("=")
            name = unquote(name).strip().lower()
            position = _position(index, len(parts), first_secret)
            if index > len(path_parts) and ";" in part:
                # RFC 7512 allows no bare `;` in the query part. Sending the
                # whole value would spend one PIN try on a mistyped PIN.
                raise URIError(
                    f"{redact_text(text)}: {position} contains an unencoded "
                    f"';', which RFC 7512 does not allow in the query part; "
                    f"{ENCODING_HINT}"
                )
            embedded = _embedded_secret(value)
            if embedded is not None:
                # RFC 7512 allows `&` in a path value, but `&pin-value=` is
                # almost surely a query typed as in an HTTP URL.
                raise URIError(
                    f"{redact_text(text)}: {position} contains "
                    f"{_embedded_marker(value, embedded)!r}: start query "
                    f"attributes with '?' ({ENCODING_HINT})"
                )
            if not sep or not name:
                raise URIError(
                    f"{redact_text(text)}: {position} is not of the form "
                    f"name=value; {ENCODING_HINT}"
                )
            if name in attributes:
                shown = position if first_secret else f"attribute {_quote(name)!r}"
                raise URIError(f"{redact_text(text)}: {shown} is given twice")
            if first_secret is None and is_secret_attribute(name):
                first_secret = name
            attributes[name] = unquote(value)
        return cls(scheme=scheme, attributes=attributes, raw=text)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.attributes.get(name, default)

    def redacted(self, known: Collection[str] | None = None) -> str:
        """Return the URI with every secret attribute's value replaced by `***`.

        With `known`, the attribute names a backend reads, an unknown
        attribute shows as `name=***`, because it may be a misspelt secret
        such as `pim-value=`. An unknown attribute after a secret attribute
        is left out, because it may be the tail of a secret that contains an
        unencoded separator.
        """
        parts = []
        after_secret = False
        for name, value in self.attributes.items():
            unknown = known is not None and name not in known
            if unknown and after_secret:
                continue
            if unknown or is_secret_attribute(name):
                parts.append(f"{_quote(name)}=***")
            else:
                parts.append(f"{_quote(name)}={_redact_value(value)}")
            after_secret = after_secret or is_secret_attribute(name)
        return f"{self.scheme}:" + ";".join(parts)

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        return f"KeyURI({self.redacted()!r})"


# Characters that end a value when parsed, so a value that contains one is
# printed percent-encoded.
_VALUE_DELIMITERS = frozenset("%;?&")


def _quote(value: str) -> str:
    """Percent-encode delimiters and unprintable characters of a value.

    `pkcs11:id=%01` decodes to a control byte, which a terminal would not
    show; the encoded form is what the user typed and parses back the same.
    """
    return "".join(
        "".join(f"%{byte:02X}" for byte in char.encode())
        if char in _VALUE_DELIMITERS or not char.isprintable()
        else char
        for char in value
    )


# `&` or `?`, a name and `=` inside one value: an attribute typed into the
# value before it, such as `object=client&pin-value=1234`.
_EMBEDDED_ATTRIBUTE = re.compile(r"[&?]([^=;&?]*)=")


def _embedded_secret(value: str) -> int | None:
    """Find a secret attribute typed inside `value`; return where it starts."""
    for match in _EMBEDDED_ATTRIBUTE.finditer(value):
        if is_secret_attribute(unquote(match.group(1))):
            return match.start()
    return None


def _embedded_marker(value: str, start: int) -> str:
    """Return the separator and name at `start`, as in `&pin-value=`."""
    name = value[start + 1 :].partition("=")[0]
    return f"{value[start]}{unquote(name).strip().lower()}="


def _redact_value(value: str) -> str:
    """Quote a value for printing, cutting it at a secret typed inside it."""
    embedded = _embedded_secret(value)
    if embedded is None:
        return _quote(value)
    head = value[:embedded]
    return f"{_quote(head)}{_quote(_embedded_marker(value, embedded))}***"


def is_secret_attribute(name: str) -> bool:
    """Tell whether attribute `name` (percent-decoded) may hold a secret."""
    name = name.strip().lower()
    if name in SECRET_ATTRIBUTES:
        return True
    # `pin-value`, `auth-value` and their misspellings (`pni-value`) carry
    # the value itself, so any `-value` attribute is treated as a secret.
    if name.endswith("-value"):
        return True
    if name.endswith(SECRET_LOCATION_SUFFIXES):
        return False
    return any(part in name for part in SECRET_NAME_PARTS)


def reject_unknown_attributes(uri: KeyURI, known: Collection[str]) -> None:
    """Raise `URIError` if `uri` has an attribute whose name is not in `known`.

    The message shows no value of an unknown attribute, and not even the
    name of one that comes after a secret attribute (see `redacted`).
    """
    names = list(uri.attributes)
    unknown = [name for name in names if name not in known]
    if not unknown:
        return
    first_secret = next((name for name in names if is_secret_attribute(name)), None)
    last_shown = names.index(first_secret) if first_secret else len(names)
    shown = [name for name in unknown if names.index(name) <= last_shown]
    problems = []
    if shown:
        problems.append(f"unknown attribute {', '.join(map(_quote, shown))}")
    hidden = len(unknown) - len(shown)
    if hidden:
        what = "attribute is" if hidden == 1 else "attributes are"
        it = "it follows" if hidden == 1 else "they follow"
        problems.append(
            f"{hidden} unknown {what} not shown because {it} {first_secret}= "
            f"and may be part of its value; {ENCODING_HINT}"
        )
    raise URIError(
        f"{uri.redacted(known)}: {'; '.join(problems)} "
        f"({uri.scheme}: URIs take {', '.join(sorted(known))})"
    )


def _split_attributes(rest: str) -> tuple[list[str], list[str]]:
    """Split the text after `scheme:` into its path and query parts."""
    path, _, query = rest.partition("?")
    return [p for p in path.split(";") if p], [p for p in query.split("&") if p]


def _position(index: int, count: int, first_secret: str | None) -> str:
    """Name the attribute at `index` (from 1) without quoting its text."""
    if first_secret is None:
        return f"attribute {index} of {count}"
    return f"attribute {index} of {count} (after {_quote(first_secret)}=)"


def redact_text(text: str, *, hide_bare_parts: bool = True) -> str:
    """Redact a URI, or text that may be one, for an error message.

    A secret attribute's value and all text after it become `***`, because
    a secret with an unencoded `;`, `?` or `&` continues past the separator.
    With `hide_bare_parts`, a part without a name or `=` becomes `***`,
    because it may be a secret typed without its name. Names are
    percent-decoded before the check, so `pin%2Dvalue=1234` is redacted like
    `pin-value=1234`.
    """
    match = _SCHEME.match(text)
    shown = match.group(0) if match else ""
    path, question, query = text[len(shown) :].partition("?")
    groups = [("", path.split(";"), ";")]
    if question:
        groups.append(("?", query.split("&"), "&"))
    for opener, parts, separator in groups:
        shown += opener
        for position, part in enumerate(parts):
            if position:
                shown += separator
            name, sep, value = part.partition("=")
            if sep and is_secret_attribute(unquote(name)):
                return f"{shown}{name}=***"
            embedded = _embedded_secret(value) if sep else None
            if embedded is not None:
                marker = _embedded_marker(value, embedded)
                return f"{shown}{name}={value[:embedded]}{marker}***"
            if opener and ";" in part:
                # The query part allows no `;`, so the value may be a
                # secret's tail after a mistyped separator.
                return f"{shown}{name if sep else ''}=***"
            if hide_bare_parts and part and not (sep and unquote(name).strip()):
                part = "***"
            shown += part
    return shown


def looks_like_uri(text: str) -> bool:
    """Tell a `scheme:...` argument from a file path."""
    return _SCHEME.match(text) is not None and _DRIVE.match(text) is None
