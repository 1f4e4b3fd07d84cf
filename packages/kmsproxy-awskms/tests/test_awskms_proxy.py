"""AWS KMS keys through the proxy, end to end, against moto's KMS server.

Each test creates a key in moto, certifies its public key with the test
client CA, and runs the proxy with `awskms:key-id=...;endpoint=...` as the
client key (through the registry and the package's entry point). curl
goes through the proxy to nginx, which requires a client certificate.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from awskms_moto import (
    MotoKMS,
    SignCall,
    aws_environment,
    moto_kms,
    sign_calls,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from peers import Peer, start_nginx
from pki import certify, make_ca
from proxy_site import Site, curl, make_site, serving
from test_cli import wait_for_line

from kmsproxy import Proxy, ProxyAddresses, Registry, SignatureScheme
from kmsproxy.cli.init import create_certificate_for_key
from kmsproxy_awskms import KMSSigner
from kmsproxy_awskms.algorithms import MAX_RAW_MESSAGE_BYTES, MessageType
from kmsproxy_awskms.self_check import LONG_MESSAGE

__all__ = ["aws_environment", "moto_kms", "sign_calls"]

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# Upper bound for the proxy process to start or stop, and for
# `kmsproxy csr`; each takes a few seconds at most on an idle machine.
PROCESS_TIMEOUT_SECONDS = 30.0

TLS12 = "TLSv1.2"
TLS13 = "TLSv1.3"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


def certify_kms_key(site: Site, moto_kms: MotoKMS, key_id: str, name: str) -> Path:
    """Write the client chain for a KMS key; return its path."""
    cert = certify(site.client_ca, name, moto_kms.public_key(key_id), client=True)
    path = site.path(f"{name}.crt")
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def nginx_for(site: Site, version: str, cert: Path | None = None) -> Peer:
    """Start nginx accepting only `version`, requiring a client certificate.

    Session tickets and the session cache are off, so every connection is
    a full handshake with a CertificateVerify.
    """
    return start_nginx(
        site.directory,
        cert or site.path("server.crt"),
        site.path("server.key"),
        site.path("client-ca.crt"),
        extra="ssl_session_tickets off; ssl_session_cache off;",
        protocols=version,
    )


async def fetch_subject(
    site: Site, addresses: ProxyAddresses, nginx: Peer
) -> subprocess.CompletedProcess[bytes]:
    """GET /subject through the proxy; stdout ends with `status=CODE`."""
    return await curl(
        "--proxy",
        addresses.proxy_url,
        "--cacert",
        str(site.path("ca.crt")),
        "--write-out",
        "status=%{http_code}",
        f"https://localhost:{nginx.port}/subject",
    )


KEY_SPECS_TLS = [
    ("ECC_NIST_P256", TLS13, "ECDSA_SHA_256"),
    ("ECC_NIST_P256", TLS12, "ECDSA_SHA_256"),
    ("ECC_NIST_P384", TLS13, "ECDSA_SHA_384"),
    ("ECC_NIST_P384", TLS12, "ECDSA_SHA_384"),
    ("ECC_NIST_P521", TLS13, "ECDSA_SHA_512"),
    ("ECC_NIST_P521", TLS12, "ECDSA_SHA_512"),
    # moto's RSASSA_PSS fails the self-check, so RSA keys sign with
    # PKCS#1 v1.5, which TLS allows in TLS 1.2 only.
    ("RSA_2048", TLS12, "RSASSA_PKCS1_V1_5_SHA_256"),
    ("RSA_3072", TLS12, "RSASSA_PKCS1_V1_5_SHA_256"),
    ("RSA_4096", TLS12, "RSASSA_PKCS1_V1_5_SHA_256"),
]


@pytest.mark.parametrize(("key_spec", "version", "algorithm"), KEY_SPECS_TLS)
async def test_key_spec_reaches_nginx(
    site: Site,
    moto_kms: MotoKMS,
    sign_calls: list[SignCall],
    key_spec: str,
    version: str,
    algorithm: str,
) -> None:
    key_id = moto_kms.create_key(key_spec)
    name = f"kms {key_spec}"
    cert = certify_kms_key(site, moto_kms, key_id, name)
    config = site.config(client_keys=[moto_kms.uri(key_id)], client_certificates=[cert])
    with nginx_for(site, version) as nginx:
        async with serving(Proxy(config)) as addresses:
            calls_at_start = len(sign_calls)
            result = await fetch_subject(site, addresses, nginx)
        subjects = nginx.client_subjects()
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == f"subject=CN={name}\nstatus=200".encode()
    assert subjects == [f"CN={name}"]
    handshake_calls = sign_calls[calls_at_start:]
    assert [c.signing_algorithm for c in handshake_calls] == [algorithm]
    assert handshake_calls[0].message_type == "RAW"


async def test_rsa_key_without_pss_fails_tls13_only(
    site: Site, moto_kms: MotoKMS
) -> None:
    """The self-check leaves the RSA key PKCS#1 v1.5 only, which TLS 1.3
    forbids in CertificateVerify: the proxy returns a 502 page that says so."""
    key_id = moto_kms.create_key("RSA_2048")
    cert = certify_kms_key(site, moto_kms, key_id, "kms rsa tls13")
    config = site.config(client_keys=[moto_kms.uri(key_id)], client_certificates=[cert])
    with nginx_for(site, TLS13) as nginx:
        async with serving(Proxy(config)) as addresses:
            result = await fetch_subject(site, addresses, nginx)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.endswith(b"status=502")
    assert b"protocol_version" in result.stdout
    assert b"1.2 alone for a key without a TLS 1.3 scheme" in result.stdout


# Extra CA certificates appended to nginx's chain. Each P-256 certificate
# is about 400 bytes of DER, so 12 of them push the TLS 1.2 handshake
# transcript that CertificateVerify signs past the 4096-byte RAW limit.
PADDING_CERTIFICATES = 12


def write_long_chain(site: Site) -> Path:
    """Write nginx's leaf followed by unrelated CA certificates."""
    padding = b"".join(
        make_ca(f"padding CA {n}").chain_pem() for n in range(PADDING_CERTIFICATES)
    )
    path = site.path("server-long-chain.crt")
    path.write_bytes(site.path("server.crt").read_bytes() + padding)
    return path


async def test_long_tls12_transcript_needs_digest(
    site: Site,
    moto_kms: MotoKMS,
    sign_calls: list[SignCall],
) -> None:
    """A transcript over 4096 bytes needs MessageType DIGEST. moto gets
    DIGEST wrong, the self-check saw that at load, so the proxy returns 502
    naming the cause and sends no Sign that would return a bad signature."""
    key_id = moto_kms.create_key("ECC_NIST_P256")
    cert = certify_kms_key(site, moto_kms, key_id, "kms long transcript")
    config = site.config(client_keys=[moto_kms.uri(key_id)], client_certificates=[cert])
    with nginx_for(site, TLS12, write_long_chain(site)) as nginx:
        async with serving(Proxy(config)) as addresses:
            calls_at_start = len(sign_calls)
            result = await fetch_subject(site, addresses, nginx)
    digest_checks = [c for c in sign_calls if c.message_type == "DIGEST"]
    assert len(digest_checks) == 1
    assert digest_checks[0].message == hashlib.sha256(LONG_MESSAGE).digest()
    assert digest_checks[0].signing_algorithm == "ECDSA_SHA_256"
    assert digest_checks[0].key_id == key_id
    assert result.stdout.endswith(b"status=502")
    assert b"needs MessageType DIGEST" in result.stdout
    assert b"failed the self-check" in result.stdout
    assert sign_calls[calls_at_start:] == []


async def test_forced_digest_signs_transcript_hash(
    site: Site,
    moto_kms: MotoKMS,
    sign_calls: list[SignCall],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forced onto DIGEST, the handshake's Sign request carries the SHA-256
    of the transcript that CertificateVerify signs. moto signs that digest
    wrongly, so the local check turns the response into a 502."""
    key_id = moto_kms.create_key("ECC_NIST_P256")
    cert = certify_kms_key(site, moto_kms, key_id, "kms forced digest")
    signer = Registry.load().open_signer(moto_kms.uri(key_id))
    assert isinstance(signer, KMSSigner)
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    signer.message_types[scheme] = frozenset(MessageType)
    signed: list[bytes] = []
    sign_blocking = KMSSigner.sign_blocking

    def record(self: KMSSigner, data: bytes, scheme: SignatureScheme) -> bytes:
        signed.append(data)
        return sign_blocking(self, data, scheme)

    monkeypatch.setattr(KMSSigner, "sign_blocking", record)
    config = site.config(client_keys=[signer], client_certificates=[cert])
    try:
        with nginx_for(site, TLS12, write_long_chain(site)) as nginx:
            async with serving(Proxy(config)) as addresses:
                calls_at_start = len(sign_calls)
                result = await fetch_subject(site, addresses, nginx)
    finally:
        await signer.aclose()
    handshake_calls = sign_calls[calls_at_start:]
    assert len(signed) == 1
    assert len(signed[0]) > MAX_RAW_MESSAGE_BYTES
    assert [c.message_type for c in handshake_calls] == ["DIGEST"]
    assert handshake_calls[0].message == hashlib.sha256(signed[0]).digest()
    assert handshake_calls[0].signing_algorithm == "ECDSA_SHA_256"
    assert result.stdout.endswith(b"status=502")
    assert b"does not verify" in result.stdout


async def test_ca_key_in_kms_mints_leaves(
    site: Site,
    moto_kms: MotoKMS,
    sign_calls: list[SignCall],
) -> None:
    ca_key_id = moto_kms.create_key("ECC_NIST_P256")
    ca_uri = moto_kms.uri(ca_key_id)
    ca_cert = await create_certificate_for_key(Registry.load(), ca_uri, "kms CA")
    ca_path = site.path("kms-ca.crt")
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    config = site.config(ca_key=ca_uri, ca_certificate=ca_path)
    with nginx_for(site, TLS13) as nginx:
        async with serving(Proxy(config)) as addresses:
            calls_at_start = len(sign_calls)
            result = await curl(
                "--proxy",
                addresses.proxy_url,
                "--cacert",
                str(ca_path),
                f"https://localhost:{nginx.port}/subject",
            )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=proxy client\n"
    minted = [c for c in sign_calls[calls_at_start:] if c.key_id == ca_key_id]
    assert [c.signing_algorithm for c in minted] == ["ECDSA_SHA_256"]


async def test_cli_serve_with_kms_key(site: Site, moto_kms: MotoKMS) -> None:
    key_id = moto_kms.create_key("ECC_NIST_P256")
    cert = certify_kms_key(site, moto_kms, key_id, "kms cli")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "kmsproxy", "serve",
            str(site.path("ca.key")), str(site.path("ca.crt")),
            "--clientkey", moto_kms.uri(key_id),
            "--clientcert", str(cert),
            "--trust", str(site.path("upstream-ca.crt")),
            "--listen", "127.0.0.1:0", "--pac-listen", "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        match = wait_for_line(process, r"Proxy listening addresses=(127\.0\.0\.1:\d+)")
        with nginx_for(site, TLS13) as nginx:
            result = await curl(
                "--proxy",
                f"http://{match.group(1)}",
                "--cacert",
                str(site.path("ca.crt")),
                f"https://localhost:{nginx.port}/subject",
            )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=PROCESS_TIMEOUT_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"subject=CN=kms cli\n"


@pytest.mark.parametrize("key_spec", ["ECC_NIST_P256", "RSA_2048"])
async def test_cli_csr_signed_in_kms(moto_kms: MotoKMS, key_spec: str) -> None:
    key_id = moto_kms.create_key(key_spec)
    with anyio.fail_after(PROCESS_TIMEOUT_SECONDS):
        result = await anyio.run_process(
            [
                sys.executable, "-m", "kmsproxy", "csr", moto_kms.uri(key_id),
                "--subject", "CN=kms csr,O=Example", "--san", "kms.example",
            ],
            check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    request = x509.load_pem_x509_csr(result.stdout)
    assert request.is_signature_valid
    assert request.public_key() == moto_kms.public_key(key_id)
    assert request.subject.rfc4514_string() == "CN=kms csr,O=Example"


@pytest.mark.parametrize("key_spec", ["ECC_NIST_P256", "RSA_2048"])
async def test_cli_init_key_signs_in_kms(
    moto_kms: MotoKMS, key_spec: str, tmp_path: Path
) -> None:
    key_id = moto_kms.create_key(key_spec)
    uri = moto_kms.uri(key_id)
    with anyio.fail_after(PROCESS_TIMEOUT_SECONDS):
        result = await anyio.run_process(
            [
                sys.executable, "-m", "kmsproxy", "init", "--key", uri,
                "--dir", str(tmp_path), "--name", "kms CA",
            ],
            check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    certificate = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    certificate.verify_directly_issued_by(certificate)
    assert certificate.public_key() == moto_kms.public_key(key_id)
    assert certificate.subject.rfc4514_string() == "CN=kms CA"
    assert not (tmp_path / "ca.key").exists()
    assert f"kmsproxy serve '{uri}' {tmp_path / 'ca.crt'}" in result.stdout.decode()
