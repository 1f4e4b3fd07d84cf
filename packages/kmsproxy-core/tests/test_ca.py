"""The local CA: certificates signed through a Signer, minted leaves, cache."""

from __future__ import annotations

import datetime
import ssl

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pki import KeyType, generate_key, issue, make_ca

from kmsproxy.ca import (
    CLOCK_SKEW_ALLOWANCE,
    MINTED_MAX_LIFETIME,
    LeafMinter,
    LeafRequest,
    LocalCA,
    create_ca_certificate,
    leaf_request_for_upstream,
)
from kmsproxy.signer import SignatureScheme, SignerError, SoftwareSigner

pytestmark = pytest.mark.anyio

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


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
    with pytest.raises(SignerError, match="does not match"):
        LocalCA(ca.cert, SoftwareSigner(generate_key("p256"), "other.key"))


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
