"""The local CA: certificates signed through a Signer, minted leaves, cache."""

from __future__ import annotations

import datetime
import ssl
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pki import KeyType, generate_key, issue, make_ca

import kmsproxy.ca
from kmsproxy.ca import (
    CA_LIFETIME,
    CLOCK_SKEW_ALLOWANCE,
    MINTED_MAX_LIFETIME,
    LeafMinter,
    LeafRequest,
    LocalCA,
    MintError,
    create_ca_certificate,
    leaf_request_for_listener,
    leaf_request_for_upstream,
)
from kmsproxy.errors import UserError
from kmsproxy.plugins.file import load_private_key
from kmsproxy.signer import SignatureScheme, SignerError, SoftwareSigner

pytestmark = pytest.mark.anyio

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)

# Maximum seconds for one openssl command; each takes milliseconds.
OPENSSL_TIMEOUT_SECONDS = 30

# An SKI that no key hash produces, as another tool or an HSM may set it.
OTHER_TOOL_SKI = bytes(range(1, 21))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def local_ca(key_type: KeyType = "p256") -> LocalCA:
    ca = make_ca(key_type=key_type)
    return LocalCA(ca.cert, SoftwareSigner(ca.key, "ca.key"))


def leaf_key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str:
    """Run a TLS handshake in memory; return the negotiated version."""
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    client_side = client.wrap_bio(client_in, client_out, server_hostname=name)
    done = {"client": False, "server": False}
    for _ in range(10):
        for role, endpoint in (("client", client_side), ("server", server_side)):
            if not done[role]:
                try:
                    endpoint.do_handshake()
                    done[role] = True
                except ssl.SSLWantReadError:
                    pass
            server_in.write(client_out.read())
            client_in.write(server_out.read())
        if all(done.values()):
            return str(client_side.version())
    raise AssertionError("handshake did not finish in 10 rounds")


def client_context(ca: LocalCA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pem = ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
    context.load_verify_locations(cadata=pem)
    return context


@pytest.mark.parametrize("key_type", ["p256", "p384", "rsa2048", "ed25519"])
async def test_signed_by_ca(key_type: KeyType) -> None:
    ca = local_ca(key_type)
    leaf = await ca.mint_leaf(LeafRequest("a.test", ("a.test",)), leaf_key())
    leaf.verify_directly_issued_by(ca.certificate)
    assert ca.signed_count == 1


async def test_rsa_pss_only_signer() -> None:
    ca = make_ca(key_type="rsa2048")

    class PSSOnly(SoftwareSigner):
        @property
        def schemes(self) -> list[SignatureScheme]:
            return [SignatureScheme.rsa_pss_rsae_sha256]

    local = LocalCA(ca.cert, PSSOnly(ca.key, "pss"))
    leaf = await local.mint_leaf(LeafRequest("a.test", ("a.test",)), leaf_key())
    leaf.verify_directly_issued_by(ca.cert)


async def test_bad_signature_raises() -> None:
    ca = make_ca()

    class WrongKey(SoftwareSigner):
        async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
            other = generate_key("p256")
            return await SoftwareSigner(other, "other").sign(data, scheme)

    local = LocalCA(ca.cert, WrongKey(ca.key, "wrong"))
    with pytest.raises(SignerError, match="does not verify"):
        await local.mint_leaf(LeafRequest("a.test"), leaf_key())


def test_mismatched_key_raises() -> None:
    ca = make_ca()
    with pytest.raises(SignerError, match="does not match") as raised:
        LocalCA(ca.cert, SoftwareSigner(generate_key("p256"), "other.key"))
    assert str(raised.value).endswith(
        "; give the key that `kmsproxy init` used (the URI or file it printed)"
    )


async def test_leaf_names_and_usage() -> None:
    ca = local_ca()
    request = LeafRequest("a.test", ("a.test", "*.a.test"), ("127.0.0.1", "::1"))
    leaf = await ca.mint_leaf(request, leaf_key())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert sans.get_values_for_type(x509.DNSName) == ["a.test", "*.a.test"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
    ]
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert constraints.value.ca is False
    assert leaf.issuer == ca.certificate.subject


async def test_leaf_lifetime_capped() -> None:
    ca = local_ca()
    leaf = await ca.mint_leaf(LeafRequest("a.test"), leaf_key(), now=NOW)
    assert leaf.not_valid_after_utc == NOW + MINTED_MAX_LIFETIME
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW_ALLOWANCE


async def test_leaf_ends_with_upstream() -> None:
    ca = local_ca()
    upstream_end = NOW + datetime.timedelta(hours=2)
    request = LeafRequest("a.test", not_after=upstream_end)
    leaf = await ca.mint_leaf(request, leaf_key(), now=NOW)
    assert leaf.not_valid_after_utc == upstream_end


def test_request_mirrors_upstream() -> None:
    ca = make_ca()
    upstream = issue(ca, "Upstream CN", dns_names=("b.test",), ip_addresses=("::1",))
    request = leaf_request_for_upstream(upstream.cert, "b.test")
    assert request.common_name == "Upstream CN"
    assert request.dns_names == ("b.test",)
    assert request.ip_addresses == ("::1",)
    assert request.not_after == upstream.cert.not_valid_after_utc


def test_request_adds_ip_literal() -> None:
    ca = make_ca()
    upstream = issue(ca, "u", dns_names=("b.test",))
    request = leaf_request_for_upstream(upstream.cert, "127.0.0.1")
    assert request.ip_addresses == ("127.0.0.1",)
    assert request.dns_names == ("b.test",)


async def test_minted_context_handshakes() -> None:
    ca = local_ca()
    minter = LeafMinter(ca)
    upstream = issue(make_ca(), "u", dns_names=("b.test",))
    server = await minter.context_for_upstream(upstream.cert, "b.test")
    assert handshake(server, client_context(ca), "b.test") == "TLSv1.3"


async def test_listener_context_handshakes_by_ip() -> None:
    ca = local_ca()
    server = await LeafMinter(ca).context_for_listener("localhost")
    assert handshake(server, client_context(ca), "127.0.0.1") == "TLSv1.3"


async def test_concurrent_requests_mint_once() -> None:
    ca = local_ca()
    minter = LeafMinter(ca)
    upstream = issue(make_ca(), "u", dns_names=("b.test",))
    contexts: list[ssl.SSLContext] = []

    async def fetch() -> None:
        contexts.append(await minter.context_for_upstream(upstream.cert, "b.test"))

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(fetch)
    assert minter.mint_count == 1
    assert len({id(c) for c in contexts}) == 1


async def test_cache_evicts_least_recent() -> None:
    minter = LeafMinter(local_ca(), cache_size=2)
    upstream_ca = make_ca()
    names = ["u0.test", "u1.test", "u2.test"]
    upstreams = [issue(upstream_ca, name, dns_names=(name,)) for name in names]
    for name, upstream in zip(names, upstreams, strict=True):
        await minter.context_for_upstream(upstream.cert, name)
    assert minter.cached_count == 2
    await minter.context_for_upstream(upstreams[2].cert, "u2.test")
    assert minter.mint_count == 3
    await minter.context_for_upstream(upstreams[0].cert, "u0.test")
    assert minter.mint_count == 4


def test_init_certificate_is_ca() -> None:
    key = generate_key("p256")
    certificate = create_ca_certificate(key, "my CA")
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert names[0].value == "my CA"
    certificate.verify_directly_issued_by(certificate)


def run_openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT_SECONDS,
        check=False,
    )


def write_pem(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def openssl_ca(directory: Path) -> tuple[Path, Path]:
    """Create a CA with `openssl req -x509` and an SKI that is not SHA-1."""
    key_path = directory / "other.key"
    certificate_path = directory / "other.crt"
    result = run_openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key_path, "-out", certificate_path,
        "-subj", "/CN=Other Tool CA", "-days", "2",
        "-addext", f"subjectKeyIdentifier={OTHER_TOOL_SKI.hex()}",
        # OpenSSL 3.0 otherwise adds an AKI from the key hash, not this SKI.
        "-addext", "authorityKeyIdentifier=keyid",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return key_path, certificate_path


async def test_aki_copies_ca_ski(tmp_path: Path) -> None:
    key_path, certificate_path = openssl_ca(tmp_path)
    certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    key = load_private_key(key_path)
    ca = LocalCA(certificate, SoftwareSigner(key, str(key_path)))
    leaf = await ca.mint_leaf(LeafRequest("a.test", ("a.test",)), leaf_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == OTHER_TOOL_SKI
    result = run_openssl(
        "verify", "-CAfile", certificate_path, write_pem(tmp_path / "leaf.crt", leaf)
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_aki_computed_without_ski() -> None:
    ca_key = generate_key("p256")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no SKI")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca = LocalCA(certificate, SoftwareSigner(ca_key, "ca.key"))
    leaf = await ca.mint_leaf(LeafRequest("a.test", ("a.test",)), leaf_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    expected = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    assert aki.key_identifier == expected.digest


def hostile_upstream(
    common_name: str | None, dns_names: Sequence[str]
) -> x509.Certificate:
    """Issue an upstream leaf whose names cryptography would not build.

    A trusted but hostile (or just unusual) CA can sign such names, so the
    test builds them with cryptography's unvalidated constructors.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _sign_unvalidated(common_name, dns_names)


def _sign_unvalidated(
    common_name: str | None, dns_names: Sequence[str]
) -> x509.Certificate:
    ca = make_ca()
    key = generate_key("p256")
    attributes = []
    if common_name is not None:
        attributes.append(
            x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)
        )
    sans: list[x509.GeneralName] = [
        x509.DNSName._init_without_validation(n) for n in dns_names
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
    return builder.sign(ca.key, hashes.SHA256())


def minted_names(leaf: x509.Certificate) -> tuple[list[str], list[str]]:
    """Return the minted leaf's CN values and DNS SANs."""
    common_names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(a.value) for a in common_names], sans.value.get_values_for_type(
        x509.DNSName
    )


async def mint_for(upstream: x509.Certificate, host: str) -> x509.Certificate:
    minter = LeafMinter(local_ca())
    await minter.context_for_upstream(upstream, host)
    return minter._cache[next(iter(minter._cache))].certificate


async def test_long_utf8_cn_replaced() -> None:
    upstream = hostile_upstream("é" * 40, ["up.test"])
    common_names, dns_names = minted_names(await mint_for(upstream, "up.test"))
    assert common_names == ["up.test"]
    assert dns_names == ["up.test"]


async def test_empty_cn_replaced() -> None:
    upstream = hostile_upstream("", ["up.test"])
    common_names, _ = minted_names(await mint_for(upstream, "up.test"))
    assert common_names == ["up.test"]


async def test_unicode_dns_name_as_a_label() -> None:
    upstream = hostile_upstream("up", ["up.test", "bücher.test"])
    _, dns_names = minted_names(await mint_for(upstream, "up.test"))
    assert dns_names == ["up.test", "xn--bcher-kva.test"]


@pytest.mark.parametrize("wildcard", ["*", "*.test", "a*.b.test", "*.*.b.test"])
async def test_odd_wildcard_dropped(wildcard: str) -> None:
    upstream = hostile_upstream("up", ["up.test", wildcard])
    _, dns_names = minted_names(await mint_for(upstream, "up.test"))
    assert dns_names == ["up.test"]


async def test_cn_dropped_when_host_too_long() -> None:
    host = ".".join(["a" * 60] * 2)
    upstream = hostile_upstream(None, [host])
    leaf = await mint_for(upstream, host)
    common_names, dns_names = minted_names(leaf)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert common_names == []
    assert dns_names == [host]
    assert san.critical is True


async def test_no_usable_name_raises() -> None:
    upstream = hostile_upstream("up", [])
    with pytest.raises(MintError, match="a b"):
        await LeafMinter(local_ca()).context_for_upstream(upstream, "a b")


async def test_hung_ca_signer_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmsproxy.ca, "CA_SIGN_TIMEOUT_SECONDS", 0.2)
    ca = make_ca()

    class Hung(SoftwareSigner):
        async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

    minter = LeafMinter(LocalCA(ca.cert, Hung(ca.key, "hung")))
    upstream = issue(make_ca(), "u", dns_names=("b.test",))
    with anyio.fail_after(5):
        with pytest.raises(MintError, match=r"did not sign within 0\.2 s"):
            await minter.context_for_upstream(upstream.cert, "b.test")


def test_ca_without_ca_flag_rejected() -> None:
    upstream = issue(make_ca(), "leaf", dns_names=("a.test",))
    with pytest.raises(UserError, match="is not a CA"):
        LocalCA(upstream.cert, SoftwareSigner(upstream.key, "leaf.key"))


def test_expired_ca_rejected() -> None:
    key = generate_key("p256")
    certificate = create_ca_certificate(
        key, "old CA", now=NOW - CA_LIFETIME - datetime.timedelta(days=1)
    )
    with pytest.raises(UserError, match="expired"):
        LocalCA(certificate, SoftwareSigner(key, "ca.key"))


async def test_listener_skips_unspecified_address() -> None:
    request = leaf_request_for_listener("0.0.0.0")  # noqa: S104
    assert "0.0.0.0" not in request.ip_addresses  # noqa: S104


async def test_mint_after_ca_expiry_raises() -> None:
    ca = local_ca()
    later = ca.certificate.not_valid_after_utc + datetime.timedelta(seconds=1)
    with pytest.raises(MintError, match="CA certificate expired"):
        await ca.mint_leaf(LeafRequest("a.test"), leaf_key(), now=later)
