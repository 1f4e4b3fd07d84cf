"""SoftHSM2 tokens for tests: a token directory, tokens, keys, certificates.

`SoftHSM` owns one SoftHSM2 configuration under a test directory. Point
`SOFTHSM2_CONF` at it with `activate`, which also re-initialises the module
in this process so it reads the new configuration. Keys are generated on
the token (they never exist outside it); certificates are imported.

A missing SoftHSM2 is a test failure naming the Debian package, not a skip.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, CertificateType, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

from kmsproxy import der
from kmsproxy.ca import choose_ca_scheme, sign_with_template_key, template_key_for
from kmsproxy.signer import PublicKey, Signer
from kmsproxy_pkcs11.modules import find_known_module, load_module
from kmsproxy_pkcs11.objects import decode_public_key
from kmsproxy_pkcs11.token import attribute_mapper

TokenKeyType = Literal["p256", "p384", "rsa2048", "rsa3072"]

USER_PIN = "123456"
SO_PIN = "12345678"

# softhsm2-util initialises a token in well under a second; the bound is for
# a loaded CI runner.
UTIL_TIMEOUT_SECONDS = 60.0

# SoftHSM2 numbers sessions from 1 after each C_Initialize; a test module
# opens a few hundred at most, so this bound counts them all.
MAX_SESSION_HANDLE = 10_000

_CURVES = {"p256": "secp256r1", "p384": "secp384r1"}
_RSA_BITS = {"rsa2048": 2048, "rsa3072": 3072}


def softhsm_module() -> Path:
    """Return the SoftHSM2 module, or fail the test naming the package."""
    path = find_known_module("softhsm2")
    if path is None:
        pytest.fail("SoftHSM2 module not found (install the Debian package softhsm2)")
    return path


@dataclass
class SoftHSM:
    """One SoftHSM2 configuration and its token directory."""

    directory: Path

    @property
    def config(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def tokens(self) -> Path:
        return self.directory / "tokens"

    @property
    def module(self) -> Path:
        return softhsm_module()

    def environment(self) -> dict[str, str]:
        """Return `os.environ` with SOFTHSM2_CONF pointing here."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.config)}

    def init_token(self, label: str, pin: str = USER_PIN) -> Path:
        """Create a token with `softhsm2-util --init-token` and rescan.

        Return the token's own directory under `tokens`, which
        `remove_token` moves aside to pull just this token.
        """
        before = set(self.tokens.iterdir())
        util = shutil.which("softhsm2-util")
        if util is None:
            pytest.fail("softhsm2-util not found (install the Debian package softhsm2)")
        result = subprocess.run(
            [
                util, "--init-token", "--free", "--label", label,
                "--pin", pin, "--so-pin", SO_PIN,
            ],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=UTIL_TIMEOUT_SECONDS,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        self.rescan()
        (created,) = set(self.tokens.iterdir()) - before
        return created

    def rescan(self) -> None:
        """Re-initialise the module here so it lists tokens made by other processes."""
        load_module(self.module).reinitialize()

    def session(self, label: str, pin: str = USER_PIN) -> pkcs11.Session:
        """Open a read-write session on token `label`, logged in."""
        library = load_module(self.module).library
        token = library.get_token(token_label=label)
        try:
            return token.open(
                rw=True, user_pin=pin, attribute_mapper=attribute_mapper()
            )
        except p11.UserAlreadyLoggedIn:
            return token.open(rw=True, attribute_mapper=attribute_mapper())

    def generate_key(
        self,
        label: str,
        key_type: TokenKeyType,
        object_id: bytes,
        object_label: str,
        *,
        allowed: Sequence[Mechanism] = (),
        pin: str = USER_PIN,
        public_label: str | None = None,
        always_authenticate: bool = False,
    ) -> PublicKey:
        """Generate a key pair on the token; return its public key.

        Both halves get `object_label` unless `public_label` names the
        public key differently (ykcs11 does). `always_authenticate` sets
        CKA_ALWAYS_AUTHENTICATE, so each signature needs the PIN again.
        """
        private: dict[Attribute, Any] = {
            Attribute.SIGN: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        }
        if allowed:
            private[Attribute.ALLOWED_MECHANISMS] = list(allowed)
        if always_authenticate:
            private[Attribute.ALWAYS_AUTHENTICATE] = True
        with self.session(label, pin) as session:
            if key_type in _CURVES:
                parameters = encode_named_curve_parameters(_CURVES[key_type])
                public, _ = session.generate_keypair(
                    KeyType.EC,
                    id=object_id,
                    label=object_label,
                    store=True,
                    public_template={Attribute.EC_PARAMS: parameters},
                    private_template=private,
                )
            else:
                public, _ = session.generate_keypair(
                    KeyType.RSA,
                    _RSA_BITS[key_type],
                    id=object_id,
                    label=object_label,
                    store=True,
                    private_template=private,
                )
            if public_label is not None:
                public[Attribute.LABEL] = public_label
            return decode_public_key(public)

    def import_certificate(
        self,
        label: str,
        certificate: x509.Certificate,
        object_id: bytes,
        object_label: str,
        pin: str = USER_PIN,
    ) -> None:
        """Store `certificate` on the token as a CKO_CERTIFICATE object."""
        with self.session(label, pin) as session:
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.ID: object_id,
                    Attribute.LABEL: object_label,
                    Attribute.SUBJECT: certificate.subject.public_bytes(),
                    Attribute.ISSUER: certificate.issuer.public_bytes(),
                    Attribute.VALUE: certificate.public_bytes(
                        serialization.Encoding.DER
                    ),
                }
            )

    def remove_tokens(self) -> Path:
        """Move the token directory aside, as if every token were pulled."""
        aside = self.directory / "tokens-removed"
        self.tokens.rename(aside)
        return aside

    def reinsert_tokens(self, aside: Path) -> None:
        """Put back a token directory that `remove_tokens` moved aside."""
        aside.rename(self.tokens)

    def remove_token(self, directory: Path) -> Path:
        """Move one token's directory aside, as if only that token were pulled."""
        aside = self.directory / f"{directory.name}-removed"
        directory.rename(aside)
        return aside

    def open_session_count(self) -> int:
        """Return how many sessions this process has open in the module.

        Asks the module itself (C_GetSessionInfo on each handle up to
        `MAX_SESSION_HANDLE`), so sessions that python-pkcs11 dropped
        without closing are counted too.
        """
        library = ctypes.CDLL(str(self.module))
        info = _SessionInfo()
        return sum(
            library.C_GetSessionInfo(ctypes.c_ulong(handle), ctypes.byref(info)) == 0
            for handle in range(1, MAX_SESSION_HANDLE + 1)
        )


class _SessionInfo(ctypes.Structure):
    """CK_SESSION_INFO (PKCS#11 v2.40 section 3.5)."""

    _fields_ = [
        ("slot_id", ctypes.c_ulong),
        ("state", ctypes.c_ulong),
        ("flags", ctypes.c_ulong),
        ("device_error", ctypes.c_ulong),
    ]


def create_softhsm(directory: Path) -> SoftHSM:
    """Write a SoftHSM2 configuration with an empty token directory."""
    directory.mkdir(parents=True, exist_ok=True)
    hsm = SoftHSM(directory)
    hsm.tokens.mkdir()
    hsm.config.write_text(
        f"directories.tokendir = {hsm.tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = true\n"
    )
    return hsm


def activate(hsm: SoftHSM) -> Iterator[SoftHSM]:
    """Point SOFTHSM2_CONF at `hsm` for a fixture's lifetime (a generator)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(hsm.config))
        hsm.rescan()
        yield hsm


async def self_signed_ca(signer: Signer, common_name: str) -> x509.Certificate:
    """Return a CA certificate over `signer`'s key, signed on the token.

    A throwaway key of the same algorithm gives the to-be-signed bytes their
    signatureAlgorithm; the token then signs those bytes (as `LocalCA.sign`
    does for leaves).
    """
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    scheme = choose_ca_scheme(signer)
    template = sign_with_template_key(builder, template_key_for(scheme), scheme)
    algorithm = der.signature_algorithm(
        template.public_bytes(serialization.Encoding.DER)
    )
    to_be_signed = template.tbs_certificate_bytes
    signature = await signer.sign(to_be_signed, scheme)
    certificate = x509.load_der_x509_certificate(
        der.assemble_signed(to_be_signed, algorithm, signature)
    )
    certificate.verify_directly_issued_by(certificate)
    return certificate


def key_uri(
    hsm: SoftHSM, token: str, object_id: bytes, *, pin: bool = True, **extra: str
) -> str:
    """Return the pkcs11: URI of an object, with ?pin-value= by default."""
    encoded = "".join(f"%{byte:02X}" for byte in object_id)
    uri = f"pkcs11:module-path={hsm.module};token={token};id={encoded}"
    for name, value in extra.items():
        uri += f";{name.replace('_', '-')}={value}"
    if pin:
        uri += f"?pin-value={USER_PIN}"
    return uri
