"""Certificates for TPM keys: `kmsproxy csr`, and the chain beside the key."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from peers import start_nginx
from pki import certify
from proxy_site import REQUEST_TIMEOUT_SECONDS, Site, curl, make_site, wait_for_identity
from swtpm_emulator import Swtpm, swtpm_module
from tpm_testkeys import create_key, key_directory, write_chain

from kmsproxy import Proxy
from kmsproxy.certificates import CertificateError
from kmsproxy.cli import main
from kmsproxy.plugins.registry import Registry
from kmsproxy_tpm.keyblob import read_key_file

__all__ = ["key_directory", "swtpm_module"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("options", [(), ("--kty", "RSA")], ids=["ec", "rsa"])
def test_csr_is_signed_by_tpm_key(
    swtpm_module: Swtpm, key_directory: Path, tmp_path: Path, options: tuple[str, ...]
) -> None:
    uri = create_key(swtpm_module, "client", *options)
    output = tmp_path / "client.csr"
    status = main(
        [
            "csr",
            uri,
            "--subject",
            "CN=tpm user",
            "--san",
            "tpm.test",
            "--out",
            str(output),
        ]
    )
    assert status == 0
    request = x509.load_pem_x509_csr(output.read_bytes())
    assert request.is_signature_valid
    assert (
        request.public_key() == read_key_file(key_directory / "client.pem").public_key
    )
    assert request.subject.rfc4514_string() == "CN=tpm user"


async def test_chain_beside_key_is_read(
    swtpm_module: Swtpm, key_directory: Path, tmp_path: Path
) -> None:
    uri = create_key(swtpm_module, "client")
    site = make_site(tmp_path)
    public_key = read_key_file(key_directory / "client.pem").public_key
    leaf = certify(site.client_ca, "beside", public_key, client=True)
    chain = write_chain(tmp_path / "chain.pem", [leaf, site.client_ca.cert])
    assert main(["tpm", "import-cert", "client", str(chain)]) == 0
    source = Registry.load().open_certificates(uri)
    loaded = await source.load()
    assert [c.subject.rfc4514_string() for c in loaded] == [
        "CN=beside",
        "CN=client CA",
    ]
    assert list(source.watch_paths()) == [key_directory / "client.crt"]


async def test_missing_chain_names_import_command(
    swtpm_module: Swtpm, key_directory: Path
) -> None:
    uri = create_key(swtpm_module, "client")
    source = Registry.load().open_certificates(uri)
    with pytest.raises(CertificateError) as raised:
        await source.load()
    message = str(raised.value)
    assert message.startswith("tpmkms:name=client;tcti=")
    assert "`kmsproxy tpm import-cert client CHAIN.pem`" in message


async def test_imported_chain_reloads_in_proxy(
    swtpm_module: Swtpm, key_directory: Path, tmp_path: Path
) -> None:
    site: Site = make_site(tmp_path)
    uri = create_key(swtpm_module, "client")
    public_key = read_key_file(key_directory / "client.pem").public_key

    def store(common_name: str) -> None:
        leaf = certify(site.client_ca, common_name, public_key, client=True)
        chain = write_chain(tmp_path / f"{common_name}.pem", [leaf])
        assert main(["tpm", "import-cert", "client", str(chain)]) == 0

    store("first")
    with start_nginx(
        site.directory,
        site.path("server.crt"),
        site.path("server.key"),
        site.path("client-ca.crt"),
    ) as nginx:
        proxy = Proxy(site.config(client_keys=[uri], client_certificates=[uri]))
        async with anyio.create_task_group() as group:
            addresses = await group.start(proxy.serve)
            store("renewed")
            await wait_for_identity(proxy, "CN=renewed")
            with anyio.fail_after(REQUEST_TIMEOUT_SECONDS):
                result = await curl(
                    "--proxy",
                    addresses.proxy_url,
                    "--cacert",
                    str(site.path("ca.crt")),
                    f"https://localhost:{nginx.port}/subject",
                )
            group.cancel_scope.cancel()
        subjects = nginx.client_subjects()
    assert result.stdout == b"subject=CN=renewed\n"
    assert subjects == ["CN=renewed"]


def test_import_cert_writes_pem_chain(
    swtpm_module: Swtpm, key_directory: Path, tmp_path: Path
) -> None:
    create_key(swtpm_module, "client")
    site = make_site(tmp_path)
    public_key = read_key_file(key_directory / "client.pem").public_key
    leaf = certify(site.client_ca, "der input", public_key, client=True)
    der_file = tmp_path / "leaf.der"
    der_file.write_bytes(leaf.public_bytes(serialization.Encoding.DER))
    assert main(["tpm", "import-cert", "client", str(der_file)]) == 0
    stored = (key_directory / "client.crt").read_bytes()
    assert stored == leaf.public_bytes(serialization.Encoding.PEM)


def test_import_cert_private_key_named(
    swtpm_module: Swtpm,
    key_directory: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    create_key(swtpm_module, "client")
    site = make_site(tmp_path)
    capsys.readouterr()
    ca_key = site.path("ca.key")
    assert main(["tpm", "import-cert", "client", str(ca_key)]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"kmsproxy: error: {ca_key}: no certificate found (it looks like a "
        "private key); give the certificate chain, leaf first\n"
    )
    assert not (key_directory / "client.crt").exists()


def test_init_key_self_signs_in_tpm(
    swtpm_module: Swtpm,
    key_directory: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = create_key(swtpm_module, "ca", "--curve", "P-384")
    arguments = ["init", "--key", uri, "--dir", str(tmp_path), "--name", "TPM CA"]
    assert main(arguments) == 0
    path = tmp_path / "ca.crt"
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    certificate.verify_directly_issued_by(certificate)
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca
    assert certificate.subject.rfc4514_string() == "CN=TPM CA"
    assert (
        certificate.public_key() == read_key_file(key_directory / "ca.pem").public_key
    )
    assert not (tmp_path / "ca.key").exists()
    assert f"kmsproxy serve '{uri}' {path}" in capsys.readouterr().out
    assert main(arguments) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert path.read_bytes() == certificate.public_bytes(serialization.Encoding.PEM)
