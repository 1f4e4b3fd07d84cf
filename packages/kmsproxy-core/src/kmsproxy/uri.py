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
from dataclasses import dataclass, field
from urllib.parse import unquote

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


class URIError(ValueError):
    """A key or certificate URI is malformed; the message names it, redacted."""


@dataclass(frozen=True)
class KeyURI:
    """A parsed step-kms-plugin style URI."""

    scheme: str
    attributes: dict[str, str] = field(default_factory=dict)
    raw: str = ""

    @classmethod
    def parse(cls, text: str) -> KeyURI:
        match = _SCHEME.match(text)
        if match is None or _DRIVE.match(text):
            raise URIError(f"{text!r} is not a URI of the form scheme:name=value")
        scheme = match.group(1).lower()
        rest = text[match.end() :]
        path, _, query = rest.partition("?")
        attributes: dict[str, str] = {}
        parts = [p for p in path.split(";") if p] + [p for p in query.split("&") if p]
        after_secret = False
        for part in parts:
            name, sep, value = part.partition("=")
            name = unquote(name).strip().lower()
            if not sep or not name:
                redacted = _redact_text(scheme, text)
                if after_secret:
                    # The part may be the rest of a secret that contains an
                    # unencoded separator, so its text is not repeated.
                    raise URIError(
                        f"{redacted}: an attribute after a secret has no value; "
                        "percent-encode ; ? and & inside a secret as %3B, %3F "
                        "and %26"
                    )
                raise URIError(f"{redacted}: attribute {name or part!r} has no value")
            after_secret = after_secret or is_secret_attribute(name)
            if name in attributes:
                redacted = _redact_text(scheme, text)
                raise URIError(f"{redacted}: attribute {name!r} is given twice")
            attributes[name] = unquote(value)
        return cls(scheme=scheme, attributes=attributes, raw=text)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.attributes.get(name, default)

    def redacted(self) -> str:
        """The URI with every secret attribute's value replaced by `***`."""
        parts = [
            f"{name}=***" if is_secret_attribute(name) else f"{name}={_quote(value)}"
            for name, value in self.attributes.items()
        ]
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


# One `name=value` attribute of a URI that may not parse: the name runs to
# `=` and the value to the next separator.
_ATTRIBUTE_TEXT = re.compile(r"([^;&?:=]+)=([^;&?]*)")


def _redact_text(scheme: str, text: str) -> str:
    """Redact secrets from a URI that failed to parse.

    Names are percent-decoded before the check, so `pin%2Dvalue=1234` is
    redacted like `pin-value=1234`.
    """

    # Everything after a secret attribute is dropped: a secret that contains
    # an unencoded `;`, `?` or `&` continues past the separator.
    for match in _ATTRIBUTE_TEXT.finditer(text):
        name = match.group(1)
        if is_secret_attribute(unquote(name)):
            return text[: match.start()] + f"{name}=***"
    return text


def looks_like_uri(text: str) -> bool:
    """Tell a `scheme:...` argument from a file path."""
    return _SCHEME.match(text) is not None and _DRIVE.match(text) is None
