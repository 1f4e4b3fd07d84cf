"""`kmsproxy pkcs11 list` and `kmsproxy csr` with a pkcs11: key, run as the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import TokenFlag
from pki import certify, make_ca
from softhsm_token import USER_PIN, SoftHSM, activate, create_softhsm, key_uri

from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import PublicKey
from kmsproxy.uri import KeyURI
from kmsproxy_pkcs11.address import parse_key_uri
from kmsproxy_pkcs11.modules import load_module

TOKEN = "cli"
# A label and an object label with characters that a pkcs11: URI must
# percent-encode.
ODD_TOKEN = "team;ops"
ODD_OBJECT = "key 50%?'&="
KEY_ID = b"\x0a"
CERTIFIED_ID = b"\x0b"

# Bound for one CLI run; the commands take well under a second.
CLI_TIMEOUT_SECONDS = 60.0

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Token:
    hsm: SoftHSM
    public_key: PublicKey
    pin_file: Path
    odd_key: PublicKey


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    directory = tmp_path_factory.mktemp("softhsm")
    hsm = create_softhsm(directory)
    pin_file = directory / "pin"
    pin_file.write_text(USER_PIN + "\n")
    for active in activate(hsm):
        active.init_token(TOKEN)
        public_key = active.generate_key(TOKEN, "p256", KEY_ID, "signing")
        certified = active.generate_key(TOKEN, "rsa2048", CERTIFIED_ID, "client")
        leaf = certify(make_ca("cli CA"), "cli client", certified, client=True)
        active.import_certificate(TOKEN, leaf, CERTIFIED_ID, "client")
        active.init_token(ODD_TOKEN)
        odd_key = active.generate_key(ODD_TOKEN, "p256", KEY_ID, ODD_OBJECT)
        yield Token(active, public_key, pin_file, odd_key)


def run_cli(hsm: SoftHSM, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsproxy", *args],
        capture_output=True,
        text=True,
        env=hsm.environment(),
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )


def test_list_shows_key_uris(token: Token) -> None:
    result = run_cli(
        token.hsm, "pkcs11", "list", "--module-path", str(token.hsm.module),
        "--pin-source", str(token.pin_file),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    base = f"pkcs11:module-path={token.hsm.module};token={TOKEN}"
    assert f"'{base};id=%0A;object=signing'" in result.stdout
    assert f"'{base};id=%0B;object=client'" in result.stdout
    assert "private key id=%0A object='signing' EC" in result.stdout
    assert "private key id=%0B object='client' RSA-2048" in result.stdout
    assert "subject=CN=cli client" in result.stdout
    assert "CKM_ECDSA" in result.stdout


def test_list_with_pin_names_pin_source(token: Token) -> None:
    result = run_cli(
        token.hsm, "pkcs11", "list", "--module-path", "softhsm2",
        "--pin-source", str(token.pin_file),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    hint = f"append ?pin-source={token.pin_file} to a key URI above"
    # Once per token, and SoftHSM2 tokens all require login.
    assert hint in result.stdout
    assert result.stdout.count(hint) == result.stdout.count(" login-required\n")
    assert USER_PIN not in result.stdout


def test_list_without_pin_hides_private_keys(token: Token) -> None:
    result = run_cli(token.hsm, "pkcs11", "list", "--module-path", "softhsm2")
    assert result.returncode == 0, result.stderr
    assert "private key id=" not in result.stdout
    assert "public key id=%0A" in result.stdout
    assert "add --pin-source FILE" in result.stdout


def test_list_missing_module_is_one_line(tmp_path: Path, token: Token) -> None:
    missing = tmp_path / "libnone.so"
    result = run_cli(token.hsm, "pkcs11", "list", "--module-path", str(missing))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"PKCS#11 module {missing} not found" in result.stderr
    assert result.stderr.endswith(" as --module-path\n")


def test_csr_is_signed_on_token(token: Token, tmp_path: Path) -> None:
    out = tmp_path / "request.csr"
    uri = key_uri(token.hsm, TOKEN, KEY_ID, pin=False)
    result = run_cli(
        token.hsm, "csr", f"{uri}?pin-source={token.pin_file}",
        "--subject", "CN=token csr", "--san", "client.test", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    request = x509.load_pem_x509_csr(out.read_bytes())
    assert request.is_signature_valid
    assert request.public_key() == token.public_key
    assert isinstance(request.public_key(), ec.EllipticCurvePublicKey)
    assert request.subject.rfc4514_string() == "CN=token csr"


def test_csr_wrong_pin_is_hidden(token: Token, tmp_path: Path) -> None:
    uri = key_uri(token.hsm, TOKEN, KEY_ID, pin=False)
    result = run_cli(
        token.hsm, "csr", f"{uri}?pin-value=918273",
        "--subject", "CN=token csr", "--out", str(tmp_path / "request.csr"),
    )  # fmt: skip
    assert result.returncode != 0
    assert "wrong PIN" in result.stderr
    assert "918273" not in result.stderr
    assert "918273" not in result.stdout


def user_pin_count_low(hsm: SoftHSM, label: str) -> bool:
    """Tell whether the token records a wrong PIN since its last login."""
    hsm.rescan()
    token = load_module(hsm.module).library.get_token(token_label=label)
    return bool(token.flags & TokenFlag.USER_PIN_COUNT_LOW)


# The right PIN followed by a mistyped separator: kmsproxy must reject the
# URI before it logs in, so the token counts no wrong PIN.
PIN_TYPOS = [
    ("id=%0C?pin-value={pin};foo", "attribute 4 of 4 contains an unencoded ';'"),
    ("object=tries&pin-value={pin}", "attribute 3 of 3 contains '&pin-value='"),
    ("id=%0C&pin-value={pin}", "attribute 3 of 3 contains '&pin-value='"),
]


def test_pin_typo_uses_no_try(token: Token, tmp_path: Path) -> None:
    label = "tries"
    token.hsm.init_token(label)
    token.hsm.generate_key(label, "p256", b"\x0c", "tries")
    base = f"pkcs11:module-path=softhsm2;token={label}"
    for typo, expected in PIN_TYPOS:
        uri = f"{base};{typo.format(pin=USER_PIN)}"
        result = run_cli(
            token.hsm, "csr", uri, "--subject", "CN=x",
            "--out", str(tmp_path / "request.csr"),
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert expected in result.stderr
        assert USER_PIN not in result.stderr
    assert not user_pin_count_low(token.hsm, label)
    # A wrong PIN does set the flag, so the check above can fail.
    wrong = run_cli(
        token.hsm, "csr", f"{base};id=%0C?pin-value=918273", "--subject", "CN=x",
        "--out", str(tmp_path / "request.csr"),
    )  # fmt: skip
    assert "wrong PIN" in wrong.stderr
    assert user_pin_count_low(token.hsm, label)


async def test_listed_uri_round_trips(token: Token) -> None:
    result = run_cli(
        token.hsm, "pkcs11", "list", "--module-path", str(token.hsm.module),
        "--pin-source", str(token.pin_file),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    private = result.stdout.split(f"private key id=%0A object={ODD_OBJECT!r}")[1]
    uri = private.splitlines()[1].strip().strip("'")
    address = parse_key_uri(KeyURI.parse(uri))
    assert address.token.label == ODD_TOKEN
    assert address.label == ODD_OBJECT
    signer = Registry.load().open_signer(f"{uri}?pin-source={token.pin_file}")
    try:
        assert signer.public_key() == token.odd_key
    finally:
        await signer.aclose()
