"""Key URIs: parsing, and redaction of secret attributes in every message."""

from __future__ import annotations

import pytest

from kmsproxy.errors import UserError
from kmsproxy.uri import KeyURI, URIError, reject_unknown_attributes

SECRET = "1234"


def parse_error(text: str) -> str:
    with pytest.raises(URIError) as raised:
        KeyURI.parse(text)
    return str(raised.value)


def test_parses_path_and_query() -> None:
    uri = KeyURI.parse("pkcs11:token=dev;id=%01?pin-source=/run/pin")
    assert uri.scheme == "pkcs11"
    assert uri.get("id") == "\x01"
    assert uri.get("pin-source") == "/run/pin"


def test_error_is_user_error() -> None:
    with pytest.raises(UserError):
        KeyURI.parse("pkcs11:token")


def test_duplicate_name_rejected() -> None:
    message = parse_error("yubikey:slot-id=9a;slot-id=9c")
    assert "given twice" in message


def test_percent_encoded_name_redacted() -> None:
    message = parse_error(f"yubikey:slot-id=9a;pin%2Dvalue={SECRET};pin%2Dvalue=1")
    assert SECRET not in message
    assert "given twice" in message


def test_percent_encoded_name_redacted_when_parsed() -> None:
    uri = KeyURI.parse(f"yubikey:slot-id=9a;pin%2Dvalue={SECRET}")
    assert SECRET not in str(uri)
    assert "pin-value=***" in str(uri)


@pytest.mark.parametrize(
    "name",
    [
        "pin-value",
        "PIN",
        "password",
        "passphrase",
        "secret-access-key",
        "session-token",
        "auth-token",
        "token-value",
        "key-value",
        "credential",
        "client-credentials",
        "auth",
    ],
)
def test_secret_names_redacted(name: str) -> None:
    uri = KeyURI.parse(f"awskms:key-id=abc;{name}={SECRET}")
    assert SECRET not in uri.redacted()
    assert SECRET not in repr(uri)
    assert "key-id=abc" in uri.redacted()


@pytest.mark.parametrize("name", ["session-token", "secret-access-key"])
def test_secret_names_redacted_in_errors(name: str) -> None:
    message = parse_error(f"awskms:{name}={SECRET};{name}={SECRET}")
    assert SECRET not in message


def test_pkcs11_token_label_kept() -> None:
    # RFC 7512: `token` is the token's label, not a secret.
    uri = KeyURI.parse("pkcs11:token=YubiKey;pin-value=1234")
    assert "token=YubiKey" in uri.redacted()
    assert "1234" not in uri.redacted()


def test_secret_locations_kept() -> None:
    uri = KeyURI.parse("file:path=a.key;password-file=pw.txt?pin-source=/run/pin")
    assert "password-file=pw.txt" in uri.redacted()
    assert "pin-source=/run/pin" in uri.redacted()


def test_missing_equals_names_position() -> None:
    message = parse_error(f"yubikey:slot-id;pin-value={SECRET}")
    assert "attribute 1 of 2 is not of the form name=value" in message
    assert "slot-id" not in message
    assert SECRET not in message


def test_value_without_name_hidden() -> None:
    message = parse_error(f"yubikey:slot-id=9a;{SECRET}")
    assert message.startswith("yubikey:slot-id=9a;***: attribute 2 of 2 ")
    assert SECRET not in message


def test_empty_name_hidden() -> None:
    message = parse_error(f"yubikey:slot-id=9a?={SECRET}")
    assert "attribute 2 of 2 is not of the form name=value" in message
    assert SECRET not in message


def test_drive_path_not_a_uri() -> None:
    path = "C:\\keys\\client.pem"
    message = parse_error(path)
    assert message == f"{path!r} is not a URI of the form scheme:name=value"


def test_not_a_uri_redacted() -> None:
    message = parse_error(f"1yubikey:pin-value={SECRET}")
    assert "is not a URI of the form scheme:name=value" in message
    assert SECRET not in message


def test_redacted_encodes_control_bytes() -> None:
    uri = KeyURI.parse("pkcs11:token=a%3Bb;id=%01%7f?pin-value=1234")
    assert uri.redacted() == "pkcs11:token=a%3Bb;id=%01%7F;pin-value=***"


@pytest.mark.parametrize(
    "text",
    [
        "tpmkms:name=k;pin-value=ab;SECRETB",
        "tpmkms:name=k;pin-value=ab?SECRETB",
        "pkcs11:token=t?pin-value=ab&SECRETB",
    ],
)
def test_split_secret_not_echoed(text: str) -> None:
    message = parse_error(text)
    assert "secretb" not in message.lower()
    assert "attribute 3 of 3 (after pin-value=)" in message
    assert "percent-encode ; ? & and % inside a value as %3B" in message


def test_split_secret_repeat_not_echoed() -> None:
    # The PIN "ab;SECRETB=1;SECRETB=2" splits into a name given twice.
    message = parse_error("tpmkms:name=k;pin-value=ab;SECRETB=1;SECRETB=2")
    assert "secretb" not in message.lower()
    assert "attribute 4 of 4 (after pin-value=) is given twice" in message


def test_misspelt_value_attribute_redacted() -> None:
    uri = KeyURI.parse("tpmkms:name=k;pni-value=SECRETD;auth-value=SECRETC")
    assert uri.redacted() == "tpmkms:name=k;pni-value=***;auth-value=***"


KNOWN = frozenset({"name", "pin-value"})


def unknown_error(text: str) -> str:
    with pytest.raises(URIError) as raised:
        reject_unknown_attributes(KeyURI.parse(text), KNOWN)
    return str(raised.value)


def test_known_attributes_pass() -> None:
    reject_unknown_attributes(KeyURI.parse(f"tpmkms:name=k;pin-value={SECRET}"), KNOWN)


@pytest.mark.parametrize("name", ["auth-value", "management-key", "pn-valeu"])
def test_unknown_attribute_value_hidden(name: str) -> None:
    message = unknown_error(f"tpmkms:name=k;{name}={SECRET}")
    assert f"unknown attribute {name} (tpmkms: URIs take name, pin-value)" in message
    assert message.startswith(f"tpmkms:name=k;{name}=***: ")
    assert SECRET not in message


def test_unknown_after_secret_hidden() -> None:
    # The PIN "ab&SECRETB=x" splits into pin-value=ab and secretb=x.
    message = unknown_error("tpmkms:name=k?pin-value=ab&SECRETB=x")
    assert "secretb" not in message.lower()
    assert "1 unknown attribute is not shown because it follows pin-value=" in message
    assert message.startswith("tpmkms:name=k;pin-value=***: ")


def test_unknown_before_secret_named() -> None:
    message = unknown_error(f"tpmkms:name=k;nmae=x?pin-value={SECRET}&other=y")
    assert "unknown attribute nmae; 1 unknown attribute is not shown" in message
    assert SECRET not in message


def test_redacted_with_known_hides_unknown() -> None:
    uri = KeyURI.parse("tpmkms:name=k;typo=a?pin-value=b&tail=c")
    assert uri.redacted(KNOWN) == "tpmkms:name=k;typo=***;pin-value=***"


# A secret typed after `&` in the path part, as in an HTTP URL. RFC 7512
# allows `&` in a path value, so only `&` before a secret name is rejected.
@pytest.mark.parametrize(
    ("text", "position"),
    [
        (
            "pkcs11:module-path=softhsm2;token=dev;object=client&pin-value=654321",
            "attribute 3 of 3",
        ),
        (
            "pkcs11:module-path=softhsm2;token=dev;id=%01&pin-value=654321",
            "attribute 3 of 3",
        ),
        (
            "tpmkms:name=mykey-pin;tcti=swtpm:host=127.0.0.1,port=24321&pin-value=654321",
            "attribute 2 of 2",
        ),
        (
            "tpmkms:name=mykey-pin&pin-value=654321;tcti=swtpm:port=24321",
            "attribute 1 of 2",
        ),
        ("yubikey:slot-id=9a&pin-value=654321", "attribute 1 of 1"),
        (
            "awskms:key-id=alias/x;region=eu-west-1&session-token=654321",
            "attribute 2 of 2",
        ),
    ],
)
def test_secret_after_ampersand_rejected(text: str, position: str) -> None:
    message = parse_error(text)
    assert "654321" not in message
    assert f"{position} contains '&" in message
    assert "start query attributes with '?'" in message


def test_ampersand_secret_rejected_once() -> None:
    message = parse_error("pkcs11:object=a&pin-value=654321")
    assert message.count("\n") == 0
    assert message.count("pin-value") == 2


def test_ampersand_without_secret_kept() -> None:
    uri = KeyURI.parse("pkcs11:object=a&b;token=x&y=z")
    assert uri.get("object") == "a&b"
    assert uri.get("token") == "x&y=z"


def test_encoded_ampersand_secret_cut() -> None:
    # `%26` is a deliberate `&`, so it parses, but redaction still cuts.
    uri = KeyURI.parse("pkcs11:token=dev;object=a%26pin-value=654321")
    assert uri.get("object") == "a&pin-value=654321"
    assert "654321" not in uri.redacted()
    assert "654321" not in repr(uri)
    assert uri.redacted() == "pkcs11:token=dev;object=a%26pin-value=***"


# RFC 7512 allows no bare `;` in the query part. A PIN that continues past
# one would reach the token whole and use up one PIN try.
@pytest.mark.parametrize(
    ("text", "position"),
    [
        (
            "pkcs11:module-path=softhsm2;token=dev;id=%01?pin-value=654321;foo",
            "attribute 4 of 4",
        ),
        ("yubikey:slot-id=9a?pin-value=654321;foo", "attribute 2 of 2"),
        (
            "tpmkms:name=mykey-pin;tcti=swtpm:port=24321?pin-value=654321;21",
            "attribute 3 of 3",
        ),
        ("awskms:key-id=alias/x?session-token=654321;foo", "attribute 2 of 2"),
    ],
)
def test_semicolon_in_query_rejected(text: str, position: str) -> None:
    message = parse_error(text)
    assert "654321" not in message
    assert f"{position} contains an unencoded ';'" in message
    assert "percent-encode ; ? & and %" in message


def test_semicolon_in_query_value_hidden() -> None:
    message = parse_error("pkcs11:token=dev?module-path=654321;x")
    assert "654321" not in message


def test_question_mark_in_query_kept() -> None:
    # RFC 7512 allows `?` in a query value.
    uri = KeyURI.parse("pkcs11:token=dev?pin-value=1234?5")
    assert uri.get("pin-value") == "1234?5"
