"""A SoftHSM2 token laid out the way ykcs11 presents a PIV YubiKey.

The token's label is "YubiKey PIV #<serial>", and each filled slot contains a
private key, a public key and an X.509 certificate with the slot's ykcs11
CKA_ID and labels (see `kmsproxy_yubikey.slots`). As in ykcs11, the key in
slot 9c has CKA_ALWAYS_AUTHENTICATE, so each signature logs in again.
`yubikey:` URIs reach the token with `module-path=` set to SoftHSM2, so the
yubikey code path runs without ykcs11 or a YubiKey.
"""

from __future__ import annotations

from cryptography import x509
from pki import Issued, certify
from softhsm_token import SoftHSM, TokenKeyType

from kmsproxy.signer import PublicKey
from kmsproxy_yubikey.slots import YUBIKEY_LABEL_PREFIX, PivSlot

SERIAL = "12345678"
TOKEN = f"{YUBIKEY_LABEL_PREFIX}{SERIAL}"

# PIV slot 9c, Digital Signature: ykcs11 marks its key CKA_ALWAYS_AUTHENTICATE
# (PIN policy ALWAYS), whatever PIN policy the key was generated with.
DIGITAL_SIGNATURE_SLOT = 0x9C

# The PIV default user PIN (Yubico ships YubiKeys with it).
PIV_PIN = "123456"


def fill_slot(
    hsm: SoftHSM,
    slot: PivSlot,
    key_type: TokenKeyType,
    issuer: Issued,
    common_name: str,
) -> tuple[PublicKey, x509.Certificate]:
    """Generate a key in `slot` and import its certificate from `issuer`."""
    object_id = bytes([slot.object_id])
    public_key = hsm.generate_key(
        TOKEN,
        key_type,
        object_id,
        slot.key_label,
        pin=PIV_PIN,
        public_label=slot.public_key_label,
        always_authenticate=slot.slot == DIGITAL_SIGNATURE_SLOT,
    )
    certificate = certify(issuer, common_name, public_key, client=True)
    hsm.import_certificate(
        TOKEN, certificate, object_id, slot.certificate_label, pin=PIV_PIN
    )
    return public_key, certificate


def slot_uri(hsm: SoftHSM, slot: str, *, pin: bool = True, serial: bool = True) -> str:
    """Return `yubikey:slot-id=...` for the stand-in, with the PIN by default."""
    uri = f"yubikey:slot-id={slot};module-path={hsm.module}"
    if serial:
        uri += f";serial={SERIAL}"
    if pin:
        uri += f"?pin-value={PIV_PIN}"
    return uri
