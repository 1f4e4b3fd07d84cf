"""TSS2 PRIVATE KEY files given by bare path, as tpm2-openssl users give them.

The registry offers each existing file to the backends first, and the TPM
backend claims a TSS2 PEM file as `tpmkms:path=...`. The TPM comes from
`KMSPROXY_TPM_TCTI`, here swtpm's TCTI, because a bare path cannot carry
`tcti=`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from peers import Peer
from pki import certify
from proxy_site import Site, site
from swtpm_emulator import Swtpm, swtpm_module
from test_proxy import anyio_backend
from test_tpm_interop import openssl
from test_tpm_proxy import fetch, fetch_through_serve, nginx, serving
from tpm_testkeys import create_ca_certificate, create_key, key_directory

from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import SignatureScheme, SignerError, verify_signature
from kmsproxy_tpm import plugin
from kmsproxy_tpm.keyblob import read_key_file
from kmsproxy_tpm.reference import TCTI_VARIABLE

__all__ = ["anyio_backend", "key_directory", "nginx", "site", "swtpm_module"]

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

MESSAGE = b"signed by a key file given by path"


@pytest.fixture
def tpm_tcti(swtpm_module: Swtpm, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point `KMSPROXY_TPM_TCTI` at the module's swtpm."""
    monkeypatch.setenv(TCTI_VARIABLE, swtpm_module.tcti)
    return swtpm_module.tcti


def openssl_key(swtpm: Swtpm, path: Path) -> Path:
    """Create an EC P-256 TSS2 key file with tpm2-openssl."""
    openssl(
        swtpm,
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "group:P-256",
        "-out",
        str(path),
    )
    return path


def certify_key_file(site: Site, path: Path, name: str) -> Path:
    """Issue a client certificate for the key file; store it beside the key."""
    leaf = certify(site.client_ca, name, read_key_file(path).public_key, client=True)
    chain = path.with_suffix(".crt")
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return chain


def test_claim_takes_tss2_pem(tmp_path: Path) -> None:
    path = tmp_path / "a;b.pem"
    head = b"-----BEGIN TSS2 PRIVATE KEY-----\nMIIB\n"
    claimed = plugin.kmsproxy_claim_key_file(path=path, head=head)
    assert claimed == f"tpmkms:path={tmp_path}/a%3Bb.pem"


def test_claim_leaves_software_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    head = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert plugin.kmsproxy_claim_key_file(path=tmp_path / "k.pem", head=head) is None


async def test_bare_path_signs_in_tpm(
    swtpm_module: Swtpm, tpm_tcti: str, tmp_path: Path
) -> None:
    path = openssl_key(swtpm_module, tmp_path / "client.pem")
    signer = Registry.load().open_signer(str(path))
    try:
        signature = await signer.sign(MESSAGE, SignatureScheme.ecdsa_secp256r1_sha256)
    finally:
        await signer.aclose()
    assert signer.uri == f"tpmkms:path={path}"
    assert signer.public_key() == read_key_file(path).public_key
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    verify_signature(signer.public_key(), signature, MESSAGE, scheme)


def test_bare_path_uses_tcti_variable(
    swtpm_module: Swtpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = openssl_key(swtpm_module, tmp_path / "client.pem")
    monkeypatch.setenv(TCTI_VARIABLE, "device:/nonexistent/tpmrm0")
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(str(path))
    message = str(raised.value)
    assert message.startswith(f"tpmkms:path={path}: ")
    assert "no TPM found at /nonexistent/tpmrm0" in message
    assert "KMSPROXY_TPM_TCTI for a key file given by path" in message


def test_software_key_stays_in_file_backend(tpm_tcti: str, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "software.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signer = Registry.load().open_signer(str(path))
    assert signer.uri == str(path)
    assert signer.public_key() == key.public_key()


def test_unreadable_pem_keeps_file_error(tpm_tcti: str, tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_bytes(b"-----BEGIN SOMETHING ELSE-----\nnot a key\n")
    with pytest.raises(SignerError, match=r"garbage\.pem: not a PEM or DER"):
        Registry.load().open_signer(str(path))


async def test_key_files_reach_nginx(
    swtpm_module: Swtpm,
    tpm_tcti: str,
    key_directory: Path,
    site: Site,
    nginx: Peer,
) -> None:
    """The client key, its chain and the CA key are all bare TSS2 paths."""
    client = openssl_key(swtpm_module, site.path("client.tss2.pem"))
    certify_key_file(site, client, "tss2 file client")
    create_key(swtpm_module, "ca")
    ca_key = key_directory / "ca.pem"
    ca_certificate = await create_ca_certificate(str(ca_key), site.path("tpm-ca"))
    async with serving(
        site,
        ca_key=str(ca_key),
        ca_certificate=ca_certificate,
        client_keys=[str(client)],
        client_certificates=[str(client)],
    ) as addresses:
        # curl trusts only the TPM CA, so the minted leaf was signed in swtpm.
        result = await fetch(
            addresses, ca_certificate, f"https://localhost:{nginx.port}/subject"
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=tss2 file client\n\nstatus=200"


@pytest.mark.parametrize("form", ["options", "go-tool"])
async def test_cli_serve_with_key_files(
    swtpm_module: Swtpm,
    tpm_tcti: str,
    key_directory: Path,
    site: Site,
    nginx: Peer,
    form: str,
) -> None:
    """`--clientkey ~/keys/client.pem` and a CA key path, as a user types
    them; in step-kmsproxy-plugin's form the chain comes from beside the key."""
    home = site.path("home")
    (home / "keys").mkdir(parents=True)
    client = openssl_key(swtpm_module, home / "keys" / "client.pem")
    chain = certify_key_file(site, client, "cli file client")
    create_key(swtpm_module, "ca")
    ca_key = key_directory / "ca.pem"
    ca_certificate = await create_ca_certificate(str(ca_key), site.path("tpm-ca"))
    if form == "options":
        arguments = [str(ca_key), str(ca_certificate)]
        arguments += ["--clientkey", "~/keys/client.pem", "--clientcert", str(chain)]
    else:
        arguments = ["~/keys/client.pem", str(ca_certificate), str(ca_key)]
    url = f"https://localhost:{nginx.port}/subject"
    result, log = await fetch_through_serve(
        site, arguments, ca_certificate, url, {"HOME": str(home)}
    )
    assert result.returncode == 0, log
    assert result.stdout == b"subject=CN=cli file client\n"
