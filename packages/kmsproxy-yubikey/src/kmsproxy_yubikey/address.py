"""`yubikey:` URIs in step-kms-plugin's form, turned into PKCS#11 addresses.

`yubikey:slot-id=9a;serial=12345678?pin-source=/run/pin` names the key
(and certificate) in PIV slot 9a of the YubiKey with that serial number.
Without `serial=` exactly one YubiKey must be present. `module-path=`
replaces Yubico's ykcs11 module, which is looked up where the operating
system's packages install it.
"""

from __future__ import annotations

from kmsproxy.uri import KeyURI
from kmsproxy_pkcs11.address import (
    KeyAddress,
    TokenSelector,
    check_attributes,
    pin_source,
)
from kmsproxy_pkcs11.modules import find_known_module

from .slots import YUBIKEY_LABEL_PREFIX, parse_slot

SCHEME = "yubikey"

# The name of Yubico's module in `kmsproxy_pkcs11.modules.KNOWN_MODULES`.
YKCS11 = "ykcs11"


def not_found_hint(serial_setting: str) -> str:
    """Return the usual reasons for "no YubiKey found", in the order to check.

    `serial_setting` is how the serial number was given: `serial=` in a
    URI or `--serial` on the command line.
    """
    return (
        "plug in the YubiKey and check that pcscd is installed and running "
        "(`apt-get install pcscd`; `ykman list` shows the YubiKey when it "
        f"is); with {serial_setting}, check the number"
    )


KNOWN_ATTRIBUTES = frozenset(
    {"slot-id", "serial", "module-path", "pin-value", "pin-source"}
)


def parse_yubikey_uri(uri: KeyURI) -> KeyAddress:
    """Read a `yubikey:` URI; raise `ValueError` naming a bad attribute."""
    check_attributes(uri, KNOWN_ATTRIBUTES)

    slot_text = uri.get("slot-id")
    if not slot_text:
        raise ValueError(
            f"{uri.redacted()}: missing slot-id= (for example yubikey:slot-id=9a)"
        )
    try:
        slot = parse_slot(slot_text)
    except ValueError as error:
        raise ValueError(f"{uri.redacted()}: {error}") from None

    serial = uri.get("serial")
    if serial is not None and not serial.isdigit():
        raise ValueError(
            f"{uri.redacted()}: serial={serial} must be the YubiKey's decimal "
            "serial number (see `kmsproxy yubikey list` or `ykman list`)"
        )
    selector = TokenSelector(
        label=f"{YUBIKEY_LABEL_PREFIX}{serial}" if serial else None,
        label_prefix=None if serial else YUBIKEY_LABEL_PREFIX,
    )
    return KeyAddress(
        uri=uri.redacted(),
        module_path=uri.get("module-path") or default_module(),
        token=selector,
        object_id=bytes([slot.object_id]),
        label=slot.key_label,
        pin=pin_source(uri),
    )


def default_module() -> str:
    """Return ykcs11's installed path, or its name so the error lists paths."""
    found = find_known_module(YKCS11)
    return str(found) if found is not None else YKCS11
