"""The yubikey: backend: ykcs11's slot layout, a stand-in token, and no YubiKey.

ykcs11 loads here but finds no YubiKey, which drives the "no YubiKey found"
errors. The signing path runs against a SoftHSM2 token laid out as ykcs11
presents a YubiKey (`yubikey_standin`), selected with module-path= and
serial=.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from pki import Issued, make_ca
from softhsm_token import SoftHSM, TokenKeyType, activate, create_softhsm
from yubikey_standin import PIV_PIN, SERIAL, TOKEN, fill_slot, slot_uri

from kmsproxy.certificates import CertificateError
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import PublicKey, SignerError, verify_signature
from kmsproxy.uri import KeyURI, URIError
from kmsproxy_pkcs11.modules import find_known_module
from kmsproxy_pkcs11.signer import Pkcs11Signer
from kmsproxy_yubikey.address import parse_yubikey_uri
from kmsproxy_yubikey.slots import PIV_SLOTS, parse_slot

pytestmark = pytest.mark.anyio

# Bound for one CLI run; listing takes well under a second.
CLI_TIMEOUT_SECONDS = 60.0

# Set to 1 by a person with a YubiKey plugged in (see docs/backends/yubikey.md).
PHYSICAL_YUBIKEY_VARIABLE = "KMSPROXY_TEST_YUBIKEY"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class StandIn:
    hsm: SoftHSM
    ca: Issued
    public_keys: dict[str, PublicKey]
    certificates: dict[str, x509.Certificate]


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    hsm = create_softhsm(tmp_path_factory.mktemp("softhsm"))
    for active in activate(hsm):
        active.init_token(TOKEN, PIV_PIN)
        ca = make_ca("yubikey test CA")
        public_keys = {}
        certificates = {}
        layout: list[tuple[str, TokenKeyType]] = [
            ("9a", "p256"),
            ("9c", "p384"),
            ("82", "rsa2048"),
        ]
        for slot, key_type in layout:
            public_keys[slot], certificates[slot] = fill_slot(
                active, parse_slot(slot), key_type, ca, f"piv {slot}"
            )
        yield StandIn(active, ca, public_keys, certificates)


@pytest.mark.parametrize(
    ("text", "object_id", "label"),
    [
        ("9a", 1, "Private key for PIV Authentication"),
        ("9C", 2, "Private key for Digital Signature"),
        ("9d", 3, "Private key for Key Management"),
        ("0x9e", 4, "Private key for Card Authentication"),
        ("82", 5, "Private key for Retired Key 1"),
        ("95", 24, "Private key for Retired Key 20"),
        ("f9", 25, "Private key for PIV Attestation"),
    ],
)
def test_slot_maps_to_ykcs11_object(text: str, object_id: int, label: str) -> None:
    slot = parse_slot(text)
    assert slot.object_id == object_id
    assert slot.key_label == label


def test_every_slot_has_its_own_id() -> None:
    ids = [slot.object_id for slot in PIV_SLOTS.values()]
    assert sorted(ids) == list(range(1, 26))


@pytest.mark.parametrize("text", ["9b", "96", "zz", ""])
def test_invalid_slot_is_named(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a PIV key slot|missing slot-id"):
        parse_yubikey_uri(KeyURI.parse(f"yubikey:slot-id={text};serial=1"))


@pytest.mark.parametrize(
    "text",
    [
        "yubikey:slot-id=9a?pni-value=SECRETD",
        "yubikey:slot-id=9a;management-key=SECRETD",
        # The PIN "ab&SECRETD=1" is split at its unencoded `&`.
        "yubikey:slot-id=9a?pin-value=ab&SECRETD=1",
    ],
    ids=["misspelt", "unsupported", "split"],
)
def test_unknown_secret_not_shown(text: str) -> None:
    with pytest.raises(URIError, match="unknown attribute") as raised:
        Registry.load().open_signer(text)
    assert "secretd" not in str(raised.value).lower()


def test_uri_selects_token_by_serial() -> None:
    address = parse_yubikey_uri(KeyURI.parse("yubikey:slot-id=9d;serial=42"))
    assert address.token.label == "YubiKey PIV #42"
    assert address.object_id == b"\x03"


def test_default_module_is_ykcs11() -> None:
    ykcs11 = find_known_module("ykcs11")
    if ykcs11 is None:
        pytest.fail("ykcs11 not found (install the Debian package ykcs11)")
    address = parse_yubikey_uri(KeyURI.parse("yubikey:slot-id=9a"))
    assert address.module_path == str(ykcs11)


def test_missing_module_names_path() -> None:
    uri = "yubikey:slot-id=9a;module-path=/nonexistent/libykcs11.so"
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(uri)
    assert "PKCS#11 module /nonexistent/libykcs11.so not found" in str(raised.value)


# The "no YubiKey found" checks go through the real ykcs11, so they cannot
# pass with a YubiKey plugged in.
needs_no_yubikey = pytest.mark.skipif(
    os.environ.get(PHYSICAL_YUBIKEY_VARIABLE) == "1",
    reason=f"expects no YubiKey attached, but {PHYSICAL_YUBIKEY_VARIABLE}=1",
)


@needs_no_yubikey
def test_no_yubikey_found_with_ykcs11() -> None:
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer("yubikey:slot-id=9a?pin-value=123456")
    message = str(raised.value)
    assert message.startswith(
        "yubikey:slot-id=9a;pin-value=***: no YubiKey found: module "
    )
    assert "lists no slots (CKR_" in message
    assert "pcscd is installed and running (`apt-get install pcscd`" in message
    assert message.endswith("with serial=, check the number")
    assert "123456" not in message


@needs_no_yubikey
def test_cli_list_says_no_yubikey() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kmsproxy", "yubikey", "list"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("kmsproxy: error: no YubiKey found: module /")
    assert "lists no slots (CKR_" in result.stderr
    assert "pcscd is installed and running (`apt-get install pcscd`" in result.stderr
    assert result.stderr.endswith("with --serial, check the number\n")


async def test_standin_slot_signs(standin: StandIn) -> None:
    signer = Registry.load().open_signer(slot_uri(standin.hsm, "9a"))
    try:
        assert signer.public_key() == standin.public_keys["9a"]
        scheme = signer.schemes[0]
        signature = await signer.sign(b"piv", scheme)
        verify_signature(signer.public_key(), signature, b"piv", scheme)
    finally:
        await signer.aclose()


async def test_standin_9c_signs_with_pin_each_time(standin: StandIn) -> None:
    signer = Registry.load().open_signer(slot_uri(standin.hsm, "9c"))
    try:
        assert isinstance(signer, Pkcs11Signer)
        assert signer.always_authenticate
        scheme = signer.schemes[0]
        for data in (b"first", b"second"):
            signature = await signer.sign(data, scheme)
            verify_signature(signer.public_key(), signature, data, scheme)
    finally:
        await signer.aclose()


async def test_standin_found_without_serial(standin: StandIn) -> None:
    signer = Registry.load().open_signer(slot_uri(standin.hsm, "82", serial=False))
    try:
        assert signer.public_key() == standin.public_keys["82"]
    finally:
        await signer.aclose()


async def test_standin_certificate_from_slot(standin: StandIn) -> None:
    uri = slot_uri(standin.hsm, "9c", pin=False)
    chain = await Registry.load().open_certificates(uri).load()
    assert chain == [standin.certificates["9c"]]


def test_wrong_serial_is_no_yubikey(standin: StandIn) -> None:
    uri = slot_uri(standin.hsm, "9a", serial=False).replace("?", ";serial=87654321?")
    with pytest.raises(SignerError, match="no YubiKey found"):
        Registry.load().open_signer(uri)


async def test_wrong_serial_certificate_is_no_yubikey(standin: StandIn) -> None:
    uri = slot_uri(standin.hsm, "9a", pin=False, serial=False) + ";serial=87654321"
    source = Registry.load().open_certificates(uri)
    with pytest.raises(CertificateError) as raised:
        await source.load()
    assert "no YubiKey found" in str(raised.value)
    assert "pcscd" in str(raised.value)


def test_empty_slot_names_selector(standin: StandIn) -> None:
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(slot_uri(standin.hsm, "9d"))
    assert "no private key id=%03;object=Private key for Key Management" in str(
        raised.value
    )


def test_missing_pin_names_pin_source(standin: StandIn) -> None:
    with pytest.raises(SignerError, match=r"requires a PIN.*pin-source="):
        Registry.load().open_signer(slot_uri(standin.hsm, "9a", pin=False))


def test_cli_list_shows_slots(standin: StandIn) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "kmsproxy", "yubikey", "list",
            "--module-path", str(standin.hsm.module),
        ],
        capture_output=True,
        text=True,
        env=standin.hsm.environment(),
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"YubiKey {SERIAL} ")
    expires = {
        slot: certificate.not_valid_after_utc.isoformat()
        for slot, certificate in standin.certificates.items()
    }
    assert (
        "  slot 9a (PIV Authentication): key EC, certificate subject=CN=piv 9a, "
        f"expires={expires['9a']}"
    ) in lines
    assert (
        "  slot 82 (Retired Key 1): key RSA-2048, certificate subject=CN=piv 82, "
        f"expires={expires['82']}"
    ) in lines
    assert (
        f"    'yubikey:slot-id=9a;serial={SERIAL};module-path={standin.hsm.module}'"
        in lines
    )
    assert not any("slot 9d" in line for line in lines)


@pytest.mark.skipif(
    os.environ.get(PHYSICAL_YUBIKEY_VARIABLE) != "1",
    reason=(
        "needs a physical YubiKey with a key and certificate in slot 9a and "
        f"{PHYSICAL_YUBIKEY_VARIABLE}=1; none can be attached here, so signing "
        "through ykcs11, touch and PIN policies and pulling the YubiKey out "
        "are untested (the SoftHSM2 stand-in covers the code path)"
    ),
)
async def test_physical_yubikey_signs() -> None:
    pin = os.environ.get("KMSPROXY_TEST_YUBIKEY_PIN", PIV_PIN)
    uri = f"yubikey:slot-id=9a?pin-value={pin}"
    registry = Registry.load()
    signer = registry.open_signer(uri)
    try:
        chain = await registry.open_certificates(uri).load()
        assert chain[0].public_key() == signer.public_key()
        scheme = signer.schemes[0]
        signature = await signer.sign(b"physical", scheme)
        verify_signature(signer.public_key(), signature, b"physical", scheme)
    finally:
        await signer.aclose()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yubikey:slot-id=9a&pin-value=654321", "attribute 1 of 1 contains '&pin-"),
        ("yubikey:slot-id=9a?pin-value=654321;foo", "contains an unencoded ';'"),
    ],
)
def test_pin_typo_not_shown(text: str, expected: str) -> None:
    with pytest.raises(URIError) as raised:
        Registry.load().open_signer(text)
    message = str(raised.value)
    assert expected in message
    assert "654321" not in message
