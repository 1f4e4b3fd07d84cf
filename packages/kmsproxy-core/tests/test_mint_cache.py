"""The minter's cached path: a leaf served before is found without minting."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pki import issue, make_ca

from kmsproxy.ca import RENEW_BEFORE_EXPIRY, LeafMinter, LocalCA
from kmsproxy.signer import SoftwareSigner

pytestmark = pytest.mark.anyio

ALPN = ("http/1.1",)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def minter(cache_size: int = 8) -> LeafMinter:
    ca = make_ca()
    return LeafMinter(LocalCA(ca.cert, SoftwareSigner(ca.key, "ca.key")), cache_size)


def upstream(
    name: str = "b.test", not_after: datetime.datetime | None = None
) -> x509.Certificate:
    return issue(make_ca(), name, dns_names=(name,), not_after=not_after).cert


def reparsed(certificate: x509.Certificate) -> x509.Certificate:
    """Return a new object for the same certificate, as a new handshake has."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_certificate(der)


async def test_listener_mint_counted_apart() -> None:
    leaves = minter()
    await leaves.context_for_listener("localhost")
    await leaves.context_for_listener("localhost")
    await leaves.context_for_upstream(upstream(), "b.test", ALPN)
    assert leaves.mint_count == 2
    assert leaves.listener_mint_count == 1


async def test_cached_miss_before_mint() -> None:
    leaf_minter = minter()
    assert leaf_minter.cached_context_for_upstream(upstream(), "b.test", ALPN) is None
    assert leaf_minter.mint_count == 0


async def test_cached_hit_after_mint() -> None:
    leaf_minter = minter()
    leaf = upstream()
    context = await leaf_minter.context_for_upstream(leaf, "b.test", ALPN)
    found = leaf_minter.cached_context_for_upstream(leaf, "b.test", ALPN)
    assert found is context
    assert leaf_minter.mint_count == 1


async def test_cached_hit_for_reparsed_leaf() -> None:
    leaf_minter = minter()
    leaf = upstream()
    context = await leaf_minter.context_for_upstream(leaf, "b.test", ALPN)
    found = leaf_minter.cached_context_for_upstream(reparsed(leaf), "b.test", ALPN)
    assert found is context


async def test_repeat_request_mints_once() -> None:
    leaf_minter = minter()
    leaf = upstream()
    first = await leaf_minter.context_for_upstream(leaf, "b.test", ALPN)
    second = await leaf_minter.context_for_upstream(reparsed(leaf), "b.test", ALPN)
    assert second is first
    assert leaf_minter.mint_count == 1


async def test_cached_miss_other_arguments() -> None:
    leaf_minter = minter()
    leaf = upstream()
    await leaf_minter.context_for_upstream(leaf, "b.test", ALPN)
    assert leaf_minter.cached_context_for_upstream(leaf, "b.test", ("h2",)) is None
    assert leaf_minter.cached_context_for_upstream(leaf, "c.test", ALPN) is None
    assert leaf_minter.cached_context_for_upstream(upstream(), "b.test", ALPN) is None


async def test_same_request_other_spelling() -> None:
    # "B.TEST" describes the same leaf as "b.test", so it shares the context.
    leaf_minter = minter()
    leaf = upstream()
    first = await leaf_minter.context_for_upstream(leaf, "b.test", ALPN)
    second = await leaf_minter.context_for_upstream(leaf, "B.TEST", ALPN)
    assert second is first
    assert leaf_minter.mint_count == 1
    found = leaf_minter.cached_context_for_upstream(leaf, "B.TEST", ALPN)
    assert found is first


async def test_cached_miss_after_eviction() -> None:
    leaf_minter = minter(cache_size=1)
    first, second = upstream("a.test"), upstream("b.test")
    await leaf_minter.context_for_upstream(first, "a.test")
    await leaf_minter.context_for_upstream(second, "b.test")
    assert leaf_minter.cached_context_for_upstream(first, "a.test") is None
    await leaf_minter.context_for_upstream(first, "a.test")
    assert leaf_minter.mint_count == 3


async def test_cached_miss_near_expiry() -> None:
    # The minted leaf ends with the upstream's, inside the renewal margin.
    leaf_minter = minter()
    now = datetime.datetime.now(datetime.UTC)
    leaf = upstream(not_after=now + RENEW_BEFORE_EXPIRY / 2)
    await leaf_minter.context_for_upstream(leaf, "b.test", ALPN)
    assert leaf_minter.cached_context_for_upstream(leaf, "b.test", ALPN) is None
    await leaf_minter.context_for_upstream(leaf, "b.test", ALPN)
    assert leaf_minter.mint_count == 2
