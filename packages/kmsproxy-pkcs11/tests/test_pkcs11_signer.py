"""The pkcs11: signer and certificate source against a real SoftHSM2 token."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, TokenFlag
from pkcs11.util.ec import encode_named_curve_parameters
from pki import Issued, certify, issue, make_ca
from softhsm_token import (
    USER_PIN,
    SoftHSM,
    TokenKeyType,
    activate,
    create_softhsm,
    key_uri,
)
from special_files import (
    SPECIAL_CASES,
    SPECIAL_FILE_TIMEOUT_SECONDS,
    special_file,
    uri_value,
)

from kmsproxy.certificates import CertificateError
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import (
    PublicKey,
    SignatureScheme,
    Signer,
    SignerError,
    verify_signature,
)
from kmsproxy.uri import KeyURI, URIError
from kmsproxy_pkcs11 import token as token_module
from kmsproxy_pkcs11.address import PinSource, parse_key_uri
from kmsproxy_pkcs11.mechanisms import fits_key_size, plan_signing
from kmsproxy_pkcs11.objects import build_chain
from kmsproxy_pkcs11.pin import describe_pin_state, read_pin
from kmsproxy_pkcs11.signer import Pkcs11Signer

pytestmark = pytest.mark.anyio

TOKEN = "dev"
# A second token on the same module, which a test pulls out on its own.
OTHER_TOKEN = "other"

# Key ids on the token: one per key type, and one RSA key that allows only
# CKM_RSA_PKCS.
KEY_IDS: dict[TokenKeyType, bytes] = {
    "p256": b"\x01",
    "p384": b"\x02",
    "rsa2048": b"\x03",
    "rsa3072": b"\x04",
}
PKCS1_ONLY_ID = b"\x05"
NO_CERTIFICATE_ID = b"\x06"
ALWAYS_AUTHENTICATE_ID = b"\x07"
RAW_PSS_ID = b"\x08"
UNSUPPORTED_CURVE_ID = b"\x09"

# Bound for waiting until the reconnect backoff lets an attempt through.
RECOVERY_TIMEOUT_SECONDS = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Token:
    """The module's SoftHSM2 token and what the tests put on it."""

    hsm: SoftHSM
    ca: Issued
    intermediate: Issued
    public_keys: dict[bytes, PublicKey]
    other_directory: Path


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    hsm = create_softhsm(tmp_path_factory.mktemp("softhsm"))
    for active in activate(hsm):
        active.init_token(TOKEN)
        ca = make_ca("token test root")
        intermediate_key = make_ca("token test intermediate")
        intermediate = Issued(
            intermediate_key.key,
            _intermediate(ca, intermediate_key),
            [],
        )
        public_keys: dict[bytes, PublicKey] = {}
        for key_type, object_id in KEY_IDS.items():
            public_key = active.generate_key(TOKEN, key_type, object_id, key_type)
            public_keys[object_id] = public_key
            leaf = certify(intermediate, f"token {key_type}", public_key, client=True)
            active.import_certificate(TOKEN, leaf, object_id, key_type)
        public_keys[PKCS1_ONLY_ID] = active.generate_key(
            TOKEN,
            "rsa2048",
            PKCS1_ONLY_ID,
            "pkcs1-only",
            allowed=[Mechanism.RSA_PKCS],
        )
        public_keys[NO_CERTIFICATE_ID] = active.generate_key(
            TOKEN, "p256", NO_CERTIFICATE_ID, "bare"
        )
        public_keys[RAW_PSS_ID] = active.generate_key(
            TOKEN, "rsa2048", RAW_PSS_ID, "raw-pss", allowed=[Mechanism.RSA_PKCS_PSS]
        )
        public_keys[ALWAYS_AUTHENTICATE_ID] = active.generate_key(
            TOKEN, "p256", ALWAYS_AUTHENTICATE_ID, "always", always_authenticate=True
        )
        active.import_certificate(TOKEN, intermediate.cert, b"\x10", "intermediate")
        active.import_certificate(TOKEN, ca.cert, b"\x11", "root")
        other_directory = active.init_token(OTHER_TOKEN)
        active.generate_key(OTHER_TOKEN, "p256", b"\x01", "other")
        yield Token(active, ca, intermediate, public_keys, other_directory)


def _intermediate(root: Issued, intermediate: Issued) -> x509.Certificate:
    """Re-issue `intermediate`'s self-signed CA certificate under `root`."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(intermediate.cert.subject)
        .issuer_name(root.cert.subject)
        .public_key(intermediate.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(intermediate.cert.not_valid_before_utc)
        .not_valid_after(intermediate.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    return builder.sign(root.key, hashes.SHA256())


def open_signer(uri: str) -> Signer:
    return Registry.load().open_signer(uri)


@pytest.mark.parametrize("key_type", list(KEY_IDS))
async def test_signer_signs_every_scheme(token: Token, key_type: TokenKeyType) -> None:
    object_id = KEY_IDS[key_type]
    signer = open_signer(key_uri(token.hsm, TOKEN, object_id))
    try:
        assert signer.public_key() == token.public_keys[object_id]
        assert signer.schemes
        for scheme in signer.schemes:
            data = f"CertificateVerify content for {scheme.name}".encode()
            signature = await signer.sign(data, scheme)
            verify_signature(signer.public_key(), signature, data, scheme)
    finally:
        await signer.aclose()


@pytest.mark.parametrize(
    ("key_type", "expected"),
    [
        ("p256", [SignatureScheme.ecdsa_secp256r1_sha256]),
        ("p384", [SignatureScheme.ecdsa_secp384r1_sha384]),
    ],
)
async def test_ec_key_reports_its_curve_scheme(
    token: Token, key_type: TokenKeyType, expected: list[SignatureScheme]
) -> None:
    signer = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS[key_type]))
    try:
        assert list(signer.schemes) == expected
    finally:
        await signer.aclose()


async def test_softhsm_ecdsa_hashes_in_software(token: Token) -> None:
    # SoftHSM2 2.6 offers CKM_ECDSA but no CKM_ECDSA_SHA256.
    signer = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS["p256"]))
    try:
        assert isinstance(signer, Pkcs11Signer)
        plan = signer.plan_for(SignatureScheme.ecdsa_secp256r1_sha256)
        assert plan.mechanism == Mechanism.ECDSA
        assert plan.prehash
    finally:
        await signer.aclose()


async def test_rsa_key_reports_pss_first(token: Token) -> None:
    signer = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS["rsa2048"]))
    try:
        assert signer.schemes[0] == SignatureScheme.rsa_pss_rsae_sha256
        assert SignatureScheme.rsa_pkcs1_sha256 in signer.schemes
    finally:
        await signer.aclose()


async def test_allowed_mechanisms_limit_schemes(token: Token) -> None:
    signer = open_signer(key_uri(token.hsm, TOKEN, PKCS1_ONLY_ID))
    try:
        assert not any(scheme.is_rsa_pss for scheme in signer.schemes)
        assert signer.schemes == [
            SignatureScheme.rsa_pkcs1_sha256,
            SignatureScheme.rsa_pkcs1_sha384,
            SignatureScheme.rsa_pkcs1_sha512,
        ]
        data = b"TLS 1.2 CertificateVerify"
        signature = await signer.sign(data, SignatureScheme.rsa_pkcs1_sha384)
        verify_signature(
            signer.public_key(), signature, data, SignatureScheme.rsa_pkcs1_sha384
        )
    finally:
        await signer.aclose()


async def test_raw_pss_hashes_in_software(token: Token) -> None:
    signer = open_signer(key_uri(token.hsm, TOKEN, RAW_PSS_ID))
    try:
        assert isinstance(signer, Pkcs11Signer)
        assert [s.name for s in signer.schemes] == [
            "rsa_pss_rsae_sha256",
            "rsa_pss_rsae_sha384",
            "rsa_pss_rsae_sha512",
        ]
        for scheme in signer.schemes:
            assert signer.plan_for(scheme).mechanism == Mechanism.RSA_PKCS_PSS
            signature = await signer.sign(b"pss", scheme)
            verify_signature(signer.public_key(), signature, b"pss", scheme)
    finally:
        await signer.aclose()


async def test_pin_always_key_signs_twice(token: Token) -> None:
    # CKA_ALWAYS_AUTHENTICATE: each C_Sign needs a context-specific login.
    signer = open_signer(key_uri(token.hsm, TOKEN, ALWAYS_AUTHENTICATE_ID))
    scheme = signer.schemes[0]
    try:
        for data in (b"first", b"second"):
            signature = await signer.sign(data, scheme)
            verify_signature(signer.public_key(), signature, data, scheme)
    finally:
        await signer.aclose()


async def test_unreported_scheme_is_value_error(token: Token) -> None:
    signer = open_signer(key_uri(token.hsm, TOKEN, PKCS1_ONLY_ID))
    try:
        with pytest.raises(ValueError, match="rsa_pss_rsae_sha256"):
            await signer.sign(b"data", SignatureScheme.rsa_pss_rsae_sha256)
    finally:
        await signer.aclose()


async def test_key_found_by_label(token: Token) -> None:
    uri = (
        f"pkcs11:module-path={token.hsm.module};token={TOKEN};object=p384"
        f"?pin-value={USER_PIN}"
    )
    signer = open_signer(uri)
    try:
        assert signer.public_key() == token.public_keys[KEY_IDS["p384"]]
    finally:
        await signer.aclose()


async def test_module_found_by_name(token: Token) -> None:
    uri = f"pkcs11:module-path=softhsm2;token={TOKEN};id=%01?pin-value={USER_PIN}"
    signer = open_signer(uri)
    try:
        assert signer.public_key() == token.public_keys[b"\x01"]
    finally:
        await signer.aclose()


async def test_keys_on_one_token_share_a_session(token: Token) -> None:
    first = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS["p256"]))
    second = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS["rsa2048"]))
    try:
        assert isinstance(first, Pkcs11Signer)
        assert isinstance(second, Pkcs11Signer)
        assert first.limiter is second.limiter
    finally:
        await first.aclose()
        await second.aclose()


async def test_certificate_chain_from_token(token: Token) -> None:
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False)
    source = Registry.load().open_certificates(uri)
    chain = await source.load()
    assert [c.subject.rfc4514_string() for c in chain] == [
        "CN=token p256",
        "CN=token test intermediate",
    ]
    assert chain[0].public_key() == token.public_keys[KEY_IDS["p256"]]


async def test_missing_certificate_names_fix(token: Token) -> None:
    uri = key_uri(token.hsm, TOKEN, NO_CERTIFICATE_ID, pin=False)
    source = Registry.load().open_certificates(uri)
    with pytest.raises(CertificateError) as raised:
        await source.load()
    assert "no certificate id=%06" in str(raised.value)
    assert "give --clientcert as a file" in str(raised.value)


def test_missing_pin_names_pin_source(token: Token) -> None:
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False)
    with pytest.raises(SignerError) as raised:
        open_signer(uri)
    assert "requires a PIN" in str(raised.value)
    assert "pin-source=" in str(raised.value)


def test_wrong_pin_hides_the_pin(token: Token) -> None:
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False) + "?pin-value=999111"
    with pytest.raises(SignerError) as raised:
        open_signer(uri)
    message = str(raised.value)
    assert "wrong PIN" in message
    assert "never retries" in message
    assert "999111" not in message
    assert "pin-value=***" in message


def test_pin_source_file_is_read(token: Token, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(f"{USER_PIN}\n")
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False)
    signer = open_signer(f"{uri}?pin-source={pin_file}")
    assert USER_PIN not in signer.uri
    assert str(pin_file) in signer.uri
    anyio.run(signer.aclose)


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
@pytest.mark.parametrize("case", sorted(SPECIAL_CASES))
def test_pin_source_special_file(token: Token, tmp_path: Path, case: str) -> None:
    source = uri_value(special_file(case, tmp_path))
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False)
    with pytest.raises(SignerError) as raised:
        open_signer(f"{uri}?pin-source={source}")
    message = str(raised.value)
    assert message.startswith(f"{uri};pin-source=")
    assert "cannot read pin-source" in message
    assert message.endswith(f": {SPECIAL_CASES[case]}")


def test_pin_source_not_utf8(token: Token, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(b"\xff\xfe\n")
    pin_file.chmod(0o600)
    with pytest.raises(SignerError, match="is not UTF-8 text"):
        read_pin(PinSource(path=pin_file), "pkcs11:token=dev")


@pytest.mark.parametrize(("mode", "warnings"), [(0o600, 0), (0o640, 1), (0o604, 1)])
async def test_readable_pin_source_warns_once(
    token: Token,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: int,
    warnings: int,
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN)
    pin_file.chmod(mode)
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False)
    for _ in range(2):
        signer = open_signer(f"{uri}?pin-source={pin_file}")
        await signer.aclose()
    found = [
        r for r in caplog.records if "readable by group or others" in r.getMessage()
    ]
    assert len(found) == warnings
    for record in found:
        assert record.levelname == "WARNING"
        assert str(pin_file) in record.getMessage()
        assert USER_PIN not in record.getMessage()


def test_missing_token_is_not_present(token: Token) -> None:
    uri = key_uri(token.hsm, "nope", KEY_IDS["p256"])
    with pytest.raises(SignerError) as raised:
        open_signer(uri)
    assert "token not present: no token matches token=nope" in str(raised.value)


def test_missing_module_names_path() -> None:
    uri = "pkcs11:module-path=/nonexistent/libp11.so;token=dev;id=%01"
    with pytest.raises(SignerError) as raised:
        open_signer(uri)
    assert "/nonexistent/libp11.so not found" in str(raised.value)
    assert "softhsm2" in str(raised.value)


async def test_module_symlink_shares_module(token: Token, tmp_path: Path) -> None:
    alias = tmp_path / "alias-libsofthsm2.so"
    alias.symlink_to(token.hsm.module)
    first = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS["p256"]))
    try:
        second_uri = key_uri(token.hsm, TOKEN, KEY_IDS["p384"])
        second = open_signer(second_uri.replace(str(token.hsm.module), str(alias)))
        try:
            assert isinstance(first, Pkcs11Signer)
            assert isinstance(second, Pkcs11Signer)
            assert first.limiter is second.limiter
        finally:
            await second.aclose()
    finally:
        await first.aclose()


async def test_module_bare_name_is_cwd_file(
    token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(token.hsm.module.parent)
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"])
    signer = open_signer(uri.replace(str(token.hsm.module), token.hsm.module.name))
    try:
        assert signer.public_key() == token.public_keys[KEY_IDS["p256"]]
    finally:
        await signer.aclose()


def test_non_library_module_has_no_cpu_hint(tmp_path: Path) -> None:
    fake = tmp_path / "libfake.so"
    fake.write_text("not a shared object\n")
    with pytest.raises(SignerError) as raised:
        open_signer(f"pkcs11:module-path={fake};token=dev;id=%01")
    assert f"cannot load PKCS#11 module {fake}" in str(raised.value)
    assert "CPU architecture" not in str(raised.value)


def test_missing_module_path_lists_known() -> None:
    with pytest.raises(SignerError) as raised:
        open_signer("pkcs11:token=dev;id=%01")
    assert "missing module-path=" in str(raised.value)
    assert "softhsm2 at " in str(raised.value)


def test_missing_key_names_selector(token: Token) -> None:
    uri = key_uri(token.hsm, TOKEN, b"\x7f")
    with pytest.raises(SignerError) as raised:
        open_signer(uri)
    assert "no private key id=%7F" in str(raised.value)


def test_id_keeps_non_utf8_bytes() -> None:
    address = parse_key_uri(KeyURI.parse("pkcs11:token=a;id=%FF%00%80"))
    assert address.object_id == b"\xff\x00\x80"


def test_unknown_attribute_is_named() -> None:
    with pytest.raises(ValueError, match="unknown attribute tokn ") as raised:
        parse_key_uri(KeyURI.parse("pkcs11:tokn=a;id=%01"))
    assert "tokn=***" in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        "pkcs11:token=a;id=%01?pni-value=SECRETD",
        "pkcs11:token=a;id=%01?so-pin=SECRETD",
        # The PIN "ab&SECRETD=1" is split at its unencoded `&`.
        "pkcs11:token=a;id=%01?pin-value=ab&SECRETD=1",
    ],
    ids=["misspelt", "unsupported", "split"],
)
def test_unknown_secret_not_shown(text: str) -> None:
    with pytest.raises(URIError, match="unknown attribute") as raised:
        Registry.load().open_signer(text)
    assert "secretd" not in str(raised.value).lower()


def test_pin_value_and_source_conflict() -> None:
    with pytest.raises(ValueError, match="not both") as raised:
        parse_key_uri(
            KeyURI.parse("pkcs11:token=a;id=%01?pin-value=4321&pin-source=/p")
        )
    assert "4321" not in str(raised.value)


def test_pin_source_repr_hides_value() -> None:
    address = parse_key_uri(KeyURI.parse("pkcs11:token=a;id=%01?pin-value=4321"))
    assert "4321" not in repr(address)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (TokenFlag.USER_PIN_COUNT_LOW, "fewer tries remain"),
        (
            TokenFlag.USER_PIN_COUNT_LOW | TokenFlag.USER_PIN_FINAL_TRY,
            "one try remains",
        ),
        (TokenFlag.USER_PIN_LOCKED, "the PIN is locked"),
        (TokenFlag.LOGIN_REQUIRED, ""),
    ],
)
def test_pin_flags_describe_tries(flags: TokenFlag, expected: str) -> None:
    described = describe_pin_state(flags)
    assert expected in described
    if not expected:
        assert described == ""


async def wait_until_signs(signer: Signer, data: bytes) -> bytes:
    """Sign until the backoff lets an attempt through and it works (bounded)."""
    scheme = signer.schemes[0]
    last: SignerError | None = None
    with anyio.move_on_after(RECOVERY_TIMEOUT_SECONDS):
        while True:
            try:
                return await signer.sign(data, scheme)
            except SignerError as error:
                last = error
                await anyio.sleep(0.1)
    raise AssertionError(f"no signature within the timeout; last error: {last}")


async def test_removed_token_recovers(
    token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kmsproxy.backoff")
    signer = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS["p256"]))
    scheme = signer.schemes[0]
    try:
        aside = token.hsm.remove_tokens()
        try:
            with pytest.raises(SignerError, match="token not present"):
                await signer.sign(b"first", scheme)
            with pytest.raises(SignerError, match=r"token not present.*retrying in"):
                await signer.sign(b"second", scheme)
        finally:
            token.hsm.reinsert_tokens(aside)
        signature = await wait_until_signs(signer, b"after")
        verify_signature(signer.public_key(), signature, b"after", scheme)
    finally:
        await signer.aclose()
    lost = [r for r in caplog.records if "store unavailable" in r.getMessage()]
    back = [r for r in caplog.records if "store available again" in r.getMessage()]
    assert len(lost) == 1
    assert len(back) == 1
    for record in caplog.records:
        assert record.getMessage().count(signer.uri) <= 1


async def test_changed_wrong_pin_is_not_resent(token: Token, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN)
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False)
    signer = open_signer(f"{uri}?pin-source={pin_file}")
    scheme = signer.schemes[0]
    try:
        aside = token.hsm.remove_tokens()
        with pytest.raises(SignerError, match="token not present"):
            await signer.sign(b"while away", scheme)
        pin_file.write_text("000000")
        token.hsm.reinsert_tokens(aside)
        messages: list[str] = []
        with anyio.fail_after(RECOVERY_TIMEOUT_SECONDS):
            while len(messages) < 2:
                try:
                    await signer.sign(b"data", scheme)
                except SignerError as error:
                    if "token not present" not in str(error):
                        messages.append(str(error))
                await anyio.sleep(0.1)
        assert "wrong PIN" in messages[0]
        assert "does not send it again" in messages[1]
        assert not any("000000" in message for message in messages)
        pin_file.write_text(USER_PIN)
        await wait_until_signs(signer, b"fixed")
    finally:
        await signer.aclose()


async def test_certificate_loads_open_no_session(token: Token) -> None:
    # The same URI, PIN included, as --clientkey and --clientcert: each
    # reload reads the certificate through the signer's session.
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"])
    signer = open_signer(uri)
    try:
        source = Registry.load().open_certificates(uri)
        await source.load()
        before = token.hsm.open_session_count()
        for _ in range(5):
            await source.load()
        assert token.hsm.open_session_count() == before
    finally:
        await signer.aclose()


async def test_certificate_load_sends_no_pin(token: Token) -> None:
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False)
    source = Registry.load().open_certificates(f"{uri}?pin-value=246810")
    for _ in range(3):
        chain = await source.load()
        assert chain[0].public_key() == token.public_keys[KEY_IDS["p256"]]


def test_rejected_pin_is_kept_per_token(token: Token) -> None:
    uri = key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False) + "?pin-value=424242"
    with pytest.raises(SignerError, match="wrong PIN"):
        open_signer(uri)
    other_key = key_uri(token.hsm, TOKEN, KEY_IDS["p384"], pin=False)
    with pytest.raises(SignerError, match="does not send it again"):
        open_signer(other_key + "?pin-value=424242")


async def test_reload_after_pin_file_change(token: Token, tmp_path: Path) -> None:
    # A reload opens the key again while the old signer is still logged in.
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN)
    uri = (
        key_uri(token.hsm, TOKEN, KEY_IDS["p256"], pin=False)
        + f"?pin-source={pin_file}"
    )
    signer = open_signer(uri)
    try:
        pin_file.write_text("102938")
        reloaded = open_signer(uri)
        await reloaded.aclose()
    finally:
        await signer.aclose()


async def test_second_key_with_other_pin_fails(token: Token) -> None:
    signer = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS["p256"]))
    try:
        other_key = key_uri(token.hsm, TOKEN, KEY_IDS["p384"], pin=False)
        with pytest.raises(SignerError, match="the same pin-source or pin-value"):
            open_signer(other_key + "?pin-value=135791")
    finally:
        await signer.aclose()


async def test_rejected_per_signature_pin_recovers(
    token: Token, tmp_path: Path
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN)
    uri = key_uri(token.hsm, TOKEN, ALWAYS_AUTHENTICATE_ID, pin=False)
    signer = open_signer(f"{uri}?pin-source={pin_file}")
    scheme = signer.schemes[0]
    try:
        await signer.sign(b"right PIN", scheme)
        pin_file.write_text("777777")
        with pytest.raises(SignerError) as first:
            await signer.sign(b"wrong PIN", scheme)
        with pytest.raises(SignerError) as second:
            await signer.sign(b"same wrong PIN", scheme)
        pin_file.write_text(USER_PIN)
        signature = await wait_until_signs(signer, b"restored")
        verify_signature(signer.public_key(), signature, b"restored", scheme)
    finally:
        await signer.aclose()
    assert "rejected the PIN" in str(first.value)
    assert "does not send it again" in str(second.value)
    assert "CKR_OPERATION_ACTIVE" not in str(second.value)


async def test_module_reinitialize_spares_other_token(
    token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Let the other token's recovery re-initialise the module at once, as
    # the first recovery after a quiet spell does.
    monkeypatch.setattr(token_module, "SHARED_MODULE_REINITIALIZE_SECONDS", 0.0)
    # Start from a fresh C_Initialize, so SoftHSM2 numbers this test's
    # sessions from 1 and the stale handle of `first` is reused below.
    token.hsm.rescan()
    first = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS["p256"]))
    second = open_signer(key_uri(token.hsm, OTHER_TOKEN, b"\x01"))
    scheme = first.schemes[0]
    try:
        aside = token.hsm.remove_token(token.other_directory)
        try:
            with pytest.raises(SignerError, match="token not present"):
                await second.sign(b"away", scheme)
        finally:
            aside.rename(token.other_directory)
        await wait_until_signs(second, b"back")
        await first.sign(b"first after the rescan", scheme)
        signature = await second.sign(b"second after the rescan", scheme)
        verify_signature(
            second.public_key(), signature, b"second after the rescan", scheme
        )
    finally:
        await first.aclose()
        await second.aclose()


async def test_lost_token_rarely_rescans_shared_module(
    token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    first = open_signer(key_uri(token.hsm, TOKEN, KEY_IDS["p256"]))
    second = open_signer(key_uri(token.hsm, OTHER_TOKEN, b"\x01"))
    scheme = first.schemes[0]
    caplog.set_level(logging.INFO, logger="kmsproxy_pkcs11.modules")
    try:
        aside = token.hsm.remove_token(token.other_directory)
        try:
            # Two reopen attempts (after 0.5 s and 1 s of backoff) while the
            # token is away; each one would re-initialise without the limit.
            with anyio.move_on_after(2.0):
                while True:
                    with pytest.raises(SignerError, match="token not present"):
                        await second.sign(b"away", scheme)
                    await anyio.sleep(0.1)
        finally:
            aside.rename(token.other_directory)
        await first.sign(b"first keeps its session", scheme)
    finally:
        await first.aclose()
        await second.aclose()
    rescans = [r for r in caplog.records if "re-initialised" in r.getMessage()]
    assert len(rescans) <= 1


async def test_renewed_token_with_other_key_fails(token: Token, tmp_path: Path) -> None:
    directory = token.hsm.init_token("renewed")
    token.hsm.generate_key("renewed", "p256", b"\x01", "original")
    signer = open_signer(key_uri(token.hsm, "renewed", b"\x01"))
    scheme = signer.schemes[0]
    try:
        await signer.sign(b"original key", scheme)
        shutil.rmtree(directory)
        token.hsm.init_token("renewed")
        token.hsm.generate_key("renewed", "p256", b"\x01", "replacement")
        with pytest.raises(SignerError) as raised:
            await signer.sign(b"replacement key", scheme)
    finally:
        await signer.aclose()
    assert "came back with a different key under id=%01" in str(raised.value)


async def test_pin_appears_nowhere(
    token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret, wrong = "740193", "586204"
    token.hsm.init_token("secret", pin=secret)
    token.hsm.generate_key("secret", "p256", b"\x01", "secret", pin=secret)
    base = key_uri(token.hsm, "secret", b"\x01", pin=False)
    texts: list[str] = []
    signer = open_signer(f"{base}?pin-value={secret}")
    try:
        texts.append(repr(signer))
        texts.append(signer.uri)
        await signer.sign(b"data", signer.schemes[0])
        source = Registry.load().open_certificates(f"{base}?pin-value={secret}")
        texts.append(repr(source))
        with pytest.raises(CertificateError) as missing:
            await source.load()
        texts.append(str(missing.value))
        with pytest.raises(SignerError) as other:
            open_signer(f"{base}?pin-value={wrong}")
        texts.append(str(other.value))
    finally:
        await signer.aclose()
    with pytest.raises(SignerError) as rejected:
        open_signer(f"{base}?pin-value={wrong}")
    texts.append(str(rejected.value))
    texts.append(caplog.text)
    assert "wrong PIN" in str(rejected.value)
    for text in texts:
        assert secret not in text
        assert wrong not in text


def test_combined_ecdsa_mechanism_is_chosen() -> None:
    # SoftHSM2 2.6 lacks CKM_ECDSA_SHA256, so only this test runs the plan.
    private_key = ec.generate_private_key(ec.SECP256R1())
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    (plan,) = plan_signing(
        private_key.public_key(), {Mechanism.ECDSA_SHA256, Mechanism.ECDSA}, None
    )
    assert plan.mechanism == Mechanism.ECDSA_SHA256
    assert plan.prepare(b"message") == b"message"
    # A token returns r||s, each as long as the curve's order.
    r, s = decode_dss_signature(private_key.sign(b"message", ec.ECDSA(hashes.SHA256())))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    verify_signature(private_key.public_key(), plan.finish(raw), b"message", scheme)


def test_chain_skips_namesake_issuer() -> None:
    root = make_ca("chain root")
    renewed = make_ca("chain intermediate")
    current = make_ca("chain intermediate")
    renewed_certificate = _intermediate(root, renewed)
    current_certificate = _intermediate(root, current)
    issuer = Issued(current.key, current_certificate, [current_certificate])
    leaf = issue(issuer, "chain leaf", client=True).cert
    chain = build_chain(leaf, [renewed_certificate, current_certificate, root.cert])
    assert chain == [leaf, current_certificate]


def test_unsupported_curve_is_signer_error(token: Token) -> None:
    # prime239v1 (X9.62): SoftHSM2 generates it, `cryptography` has no class.
    with token.hsm.session(TOKEN) as session:
        session.generate_keypair(
            KeyType.EC,
            id=UNSUPPORTED_CURVE_ID,
            label="prime239v1",
            store=True,
            public_template={
                Attribute.EC_PARAMS: encode_named_curve_parameters("prime239v1")
            },
        )
    with pytest.raises(SignerError) as raised:
        open_signer(key_uri(token.hsm, TOKEN, UNSUPPORTED_CURVE_ID))
    assert "EC curve 1.2.840.10045.3.1.4 is not supported" in str(raised.value)


@pytest.mark.parametrize(
    ("mechanism", "minimum", "maximum", "fits"),
    [
        (Mechanism.SHA256_RSA_PKCS_PSS, 512, 16384, True),
        (Mechanism.SHA256_RSA_PKCS_PSS, 1024, 2048, False),
        (Mechanism.RSA_PKCS, 4096, 8192, False),
        (Mechanism.RSA_PKCS, 0, 0, True),
        (Mechanism.ECDSA, 1024, 2048, True),
    ],
)
def test_mechanism_key_size_range(
    token: Token, mechanism: Mechanism, minimum: int, maximum: int, fits: bool
) -> None:
    rsa3072 = token.public_keys[KEY_IDS["rsa3072"]]
    assert fits_key_size(mechanism, minimum, maximum, rsa3072) is fits
