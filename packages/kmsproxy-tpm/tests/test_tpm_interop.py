"""TSS2 PEM keys shared with tpm2-openssl and tpm2-tools, both directions.

Keys made by `openssl genpkey -provider tpm2` and by `tpm2_create` plus
`tpm2_encodeobject` sign in kmsproxy; a key made by `kmsproxy tpm create`
signs in `openssl pkeyutl -provider tpm2`. Every signature is checked
against the public key with `cryptography`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from swtpm_emulator import Swtpm, swtpm_module
from tpm2_pytss.tsskey import TSSPrivKey
from tpm_testkeys import create_key, key_directory, open_signer, transient_handles

from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import SignerError, verify_signature
from kmsproxy_tpm.keyblob import read_key_file

__all__ = ["key_directory", "swtpm_module"]

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

MESSAGE = b"signed by a key that two programs share"

# Bound on one openssl or tpm2-tools command; each takes well under 1 s on
# swtpm, except RSA key generation, which can take several seconds.
TOOL_TIMEOUT_SECONDS = 60.0

# The storage primary key template that TSS2 PEM keys with parent 0x40000001
# assume (ECC P-256 with AES-128-CFB, as tpm2-openssl and tpm2-pytss make it),
# in tpm2_createprimary's syntax.
SRK_ALGORITHM = "ecc256:aes128cfb"
SRK_ATTRIBUTES = (
    "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"
)

# A persistent handle in the owner range, where an SRK is usually kept.
PERSISTENT_PARENT = "0x81000001"


# A P-256 key whose template fixes ECDSA with SHA-384, a pair that no TLS
# signature scheme uses (TLS 1.3 pairs P-256 with SHA-256).
FIXED_NON_TLS = "ecc256:ecdsa-sha384"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def run_tool(swtpm: Swtpm, *args: str, package: str) -> None:
    """Run an openssl or tpm2-tools command against swtpm; fail with its output."""
    if shutil.which(args[0]) is None:
        pytest.fail(
            f"{args[0]} not found on PATH (install the Debian package {package})"
        )
    environment = {
        **os.environ,
        "TPM2TOOLS_TCTI": swtpm.tcti,
        "TPM2OPENSSL_TCTI": swtpm.tcti,
    }
    result = subprocess.run(
        args,
        env=environment,
        capture_output=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} failed: {result.stdout.decode()}{result.stderr.decode()}"
    )


def openssl(swtpm: Swtpm, *args: str) -> None:
    run_tool(
        swtpm,
        "openssl",
        *args[:1],
        "-provider",
        "tpm2",
        "-provider",
        "default",
        *args[1:],
        package="tpm2-openssl",
    )


def tpm2(swtpm: Swtpm, tool: str, *args: str) -> None:
    run_tool(swtpm, f"tpm2_{tool}", *args, package="tpm2-tools")


async def check_signs_every_scheme(uri: str) -> list[str]:
    async with open_signer(uri) as signer:
        for scheme in signer.schemes:
            signature = await signer.sign(MESSAGE, scheme)
            verify_signature(signer.public_key(), signature, MESSAGE, scheme)
        return [scheme.name for scheme in signer.schemes]


@pytest.mark.parametrize(
    ("algorithm", "option", "first_scheme"),
    [
        ("EC", "group:P-256", "ecdsa_secp256r1_sha256"),
        ("RSA", "bits:2048", "rsa_pss_rsae_sha256"),
    ],
    ids=["ec", "rsa"],
)
async def test_openssl_key_signs_in_kmsproxy(
    swtpm_module: Swtpm, tmp_path: Path, algorithm: str, option: str, first_scheme: str
) -> None:
    key = tmp_path / "openssl.pem"
    openssl(
        swtpm_module,
        "genpkey",
        "-algorithm",
        algorithm,
        "-pkeyopt",
        option,
        "-out",
        str(key),
    )
    uri = f"tpmkms:path={key};tcti={swtpm_module.tcti}"
    schemes = await check_signs_every_scheme(uri)
    assert schemes[0] == first_scheme


@pytest.mark.parametrize("options", [(), ("--kty", "RSA")], ids=["ec", "rsa"])
def test_kmsproxy_key_signs_in_openssl(
    swtpm_module: Swtpm, key_directory: Path, tmp_path: Path, options: tuple[str, ...]
) -> None:
    create_key(swtpm_module, "shared", *options)
    key = key_directory / "shared.pem"
    digest = tmp_path / "digest"
    digest.write_bytes(hashlib.sha256(MESSAGE).digest())
    signature = tmp_path / "signature"
    openssl(
        swtpm_module,
        "pkeyutl",
        "-sign",
        "-inkey",
        str(key),
        "-in",
        str(digest),
        "-out",
        str(signature),
    )
    public_key = read_key_file(key).public_key
    prehashed = utils.Prehashed(hashes.SHA256())
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(
            signature.read_bytes(), digest.read_bytes(), ec.ECDSA(prehashed)
        )
    else:
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(
            signature.read_bytes(), digest.read_bytes(), padding.PKCS1v15(), prehashed
        )


@pytest.fixture
def srk_context(swtpm_module: Swtpm, tmp_path: Path) -> Iterator[Path]:
    """Create the standard storage primary key with tpm2_createprimary."""
    context = tmp_path / "srk.ctx"
    tpm2(
        swtpm_module,
        "createprimary",
        "-C",
        "o",
        "-g",
        "sha256",
        "-G",
        SRK_ALGORITHM,
        "-a",
        SRK_ATTRIBUTES,
        "-c",
        str(context),
        "-Q",
    )
    yield context
    tpm2(swtpm_module, "flushcontext", "--transient-object")


def encode_tools_key(swtpm: Swtpm, parent: str, tmp_path: Path, algorithm: str) -> Path:
    """Create a key with tpm2_create and write it with tpm2_encodeobject."""
    public, private = tmp_path / "key.pub", tmp_path / "key.priv"
    tpm2(
        swtpm,
        "create",
        "-C",
        parent,
        "-G",
        algorithm,
        "-u",
        str(public),
        "-r",
        str(private),
        "-Q",
    )
    pem = tmp_path / "tools.pem"
    tpm2(
        swtpm,
        "encodeobject",
        "-C",
        parent,
        "-u",
        str(public),
        "-r",
        str(private),
        "-o",
        str(pem),
    )
    tpm2(swtpm, "flushcontext", "--transient-object")
    return pem


async def test_tpm2_tools_key_signs_in_kmsproxy(
    swtpm_module: Swtpm, tmp_path: Path, srk_context: Path
) -> None:
    pem = encode_tools_key(swtpm_module, str(srk_context), tmp_path, "ecc256")
    schemes = await check_signs_every_scheme(
        f"tpmkms:path={pem};tcti={swtpm_module.tcti}"
    )
    assert schemes == ["ecdsa_secp256r1_sha256"]


async def test_persistent_parent_key_signs(
    swtpm_module: Swtpm, tmp_path: Path, srk_context: Path
) -> None:
    tpm2(
        swtpm_module,
        "evictcontrol",
        "-C",
        "o",
        "-c",
        str(srk_context),
        PERSISTENT_PARENT,
    )
    # The persistent copy is enough; swtpm holds only 3 transient objects.
    tpm2(swtpm_module, "flushcontext", "--transient-object")
    try:
        pem = encode_tools_key(swtpm_module, PERSISTENT_PARENT, tmp_path, "rsa2048")
        uri = f"tpmkms:path={pem};tcti={swtpm_module.tcti}"
        schemes = await check_signs_every_scheme(uri)
    finally:
        tpm2(swtpm_module, "evictcontrol", "-C", "o", "-c", PERSISTENT_PARENT)
    assert "rsa_pkcs1_sha256" in schemes


def test_missing_persistent_parent_is_named(
    swtpm_module: Swtpm, key_directory: Path, tmp_path: Path
) -> None:
    create_key(swtpm_module, "orphan")
    blob = read_key_file(key_directory / "orphan.pem")
    orphan = TSSPrivKey(
        blob.key.private, blob.key.public, empty_auth=True, parent=0x81000002
    )
    pem = tmp_path / "orphan.pem"
    pem.write_bytes(orphan.to_pem())
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(f"tpmkms:path={pem};tcti={swtpm_module.tcti}")
    assert "under its parent 0x81000002" in str(raised.value)
    assert transient_handles(swtpm_module) == []


def test_fixed_scheme_without_tls_match_is_named(
    swtpm_module: Swtpm, tmp_path: Path, srk_context: Path
) -> None:
    pem = encode_tools_key(swtpm_module, str(srk_context), tmp_path, FIXED_NON_TLS)
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(f"tpmkms:path={pem};tcti={swtpm_module.tcti}")
    message = str(raised.value)
    assert "template allows only ecdsa with sha384" in message
    assert "no TLS signature scheme uses" in message
