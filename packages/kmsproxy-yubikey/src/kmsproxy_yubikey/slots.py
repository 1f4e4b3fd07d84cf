"""PIV slots and the PKCS#11 objects that ykcs11 presents for each.

Yubico's ykcs11 module (yubico-piv-tool, `ykcs11/objects.c`) shows each PIV
slot as a private key, a public key and an X.509 certificate that share one
CKA_ID: 1 to 4 for the slots 9a, 9c, 9d and 9e, 5 to 24 for the retired
key management slots 82 to 95, and 25 for the attestation slot f9. The
labels follow the slot's name, for example "Private key for PIV
Authentication" and "X.509 Certificate for PIV Authentication". Each
token's label is "YubiKey PIV #" and the YubiKey's serial number.
"""

from __future__ import annotations

from dataclasses import dataclass

# ykcs11's token label, before the YubiKey's serial number.
YUBIKEY_LABEL_PREFIX = "YubiKey PIV #"

# The first and last retired key management slots (NIST SP 800-73-4, part 1,
# table 4b) and the CKA_ID that ykcs11 gives the first.
FIRST_RETIRED_SLOT = 0x82
LAST_RETIRED_SLOT = 0x95
FIRST_RETIRED_ID = 5


@dataclass(frozen=True)
class PivSlot:
    """One PIV key slot and its ykcs11 object id and labels."""

    slot: int
    object_id: int
    name: str

    @property
    def hex(self) -> str:
        return f"{self.slot:02x}"

    @property
    def key_label(self) -> str:
        return f"Private key for {self.name}"

    @property
    def public_key_label(self) -> str:
        return f"Public key for {self.name}"

    @property
    def certificate_label(self) -> str:
        return f"X.509 Certificate for {self.name}"


def _build_slots() -> dict[int, PivSlot]:
    slots = [
        PivSlot(0x9A, 1, "PIV Authentication"),
        PivSlot(0x9C, 2, "Digital Signature"),
        PivSlot(0x9D, 3, "Key Management"),
        PivSlot(0x9E, 4, "Card Authentication"),
    ]
    for index, slot in enumerate(range(FIRST_RETIRED_SLOT, LAST_RETIRED_SLOT + 1)):
        slots.append(
            PivSlot(slot, FIRST_RETIRED_ID + index, f"Retired Key {index + 1}")
        )
    slots.append(PivSlot(0xF9, 25, "PIV Attestation"))
    return {slot.slot: slot for slot in slots}


PIV_SLOTS: dict[int, PivSlot] = _build_slots()


def parse_slot(text: str) -> PivSlot:
    """Return the slot named by `9a`, `9A` or `0x9a`; raise `ValueError`."""
    cleaned = text.strip().lower().removeprefix("0x")
    try:
        number = int(cleaned, 16)
    except ValueError:
        number = -1
    slot = PIV_SLOTS.get(number)
    if slot is None:
        raise ValueError(
            f"slot-id={text} is not a PIV key slot; use 9a, 9c, 9d, 9e, "
            "82 to 95 (retired) or f9 (attestation)"
        )
    return slot
