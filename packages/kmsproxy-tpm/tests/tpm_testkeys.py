"""Keys for the TPM backend's tests: made in swtpm by the real CLI.

`key_directory` points XDG_CONFIG_HOME at the test's temporary directory,
so `kmsproxy tpm create` writes there. `create_key` runs that command in
this process; `open_signer` opens a URI through the real registry and entry
point. `self_signed_ca` makes a CA certificate whose signature comes from a
TPM key, as `LocalCA.sign` does for leaves.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from swtpm_emulator import Swtpm
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_HC

from kmsproxy import der
from kmsproxy.ca import choose_ca_scheme, sign_with_template_key, template_key_for
from kmsproxy.cli import main
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import Signer

# More handles than swtpm can hold (3 transient objects in libtpms 0.9).
MAX_LISTED_HANDLES = 16


@pytest.fixture
def key_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the key directory at the test's temporary directory."""
    config = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    return config / "kmsproxy" / "tpm"


def create_key(swtpm: Swtpm, name: str, *options: str) -> str:
    """Create a key with `kmsproxy tpm create`; return its URI."""
    status = main(["tpm", "create", name, "--tcti", swtpm.tcti, *options])
    assert status == 0, f"kmsproxy tpm create {name} {' '.join(options)} failed"
    return key_uri(swtpm, name)


def key_uri(swtpm: Swtpm, name: str, extra: str = "") -> str:
    return f"tpmkms:name={name};tcti={swtpm.tcti}{extra}"


@asynccontextmanager
async def open_signer(uri: str) -> AsyncIterator[Signer]:
    """Open `uri` through the installed entry points; close it afterwards.

    Closing matters: swtpm serves one connection at a time, and without a
    resource manager it keeps loaded keys until they are flushed.
    """
    signer = Registry.load().open_signer(uri)
    try:
        yield signer
    finally:
        await signer.aclose()


async def self_signed_ca(signer: Signer, common_name: str) -> x509.Certificate:
    """Return a CA certificate over the signer's key, signed by that key."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = signer.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
    )
    scheme = choose_ca_scheme(signer)
    template = sign_with_template_key(builder, template_key_for(scheme), scheme)
    tbs = template.tbs_certificate_bytes
    algorithm = der.signature_algorithm(
        template.public_bytes(serialization.Encoding.DER)
    )
    signature = await signer.sign(tbs, scheme)
    return x509.load_der_x509_certificate(
        der.assemble_signed(tbs, algorithm, signature)
    )


def write_chain(path: Path, chain: list[x509.Certificate]) -> Path:
    path.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    )
    return path


def transient_handles(swtpm: Swtpm) -> list[int]:
    """Return the TPM's loaded transient objects.

    swtpm has no resource manager, so an object that kmsproxy loaded and
    never flushed stays here until the TPM restarts.
    """
    with ESAPI(swtpm.tcti) as esapi:
        _, data = esapi.get_capability(
            TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, MAX_LISTED_HANDLES
        )
        return [int(handle) for handle in data.data.handles]
