"""Pairing client keys with certificate chains."""

from __future__ import annotations

import datetime
import logging
import types
from pathlib import Path

import pytest
from pki import issue, make_ca

from kmsproxy.errors import UserError
from kmsproxy.identity import Identity, IdentityStore, pair_identities
from kmsproxy.plugins.file import load_private_key
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import Signer, SoftwareSigner
from kmsproxy.uri import KeyURI


def test_pairs_by_public_key() -> None:
    ca = make_ca()
    alice, bob = issue(ca, "alice", client=True), issue(ca, "bob", client=True)
    signers = [SoftwareSigner(bob.key, "bob.key"), SoftwareSigner(alice.key, "a.key")]
    pairing = pair_identities(signers, [("a.crt", alice.chain), ("b.crt", bob.chain)])
    assert [i.subject for i in pairing.identities] == ["CN=alice", "CN=bob"]
    assert [i.signer.uri for i in pairing.identities] == ["a.key", "bob.key"]
    assert pairing.unmatched_keys == ()
    assert pairing.unmatched_certificates == ()


def test_reports_unmatched_sides() -> None:
    ca = make_ca()
    alice, bob, carol = (issue(ca, n, client=True) for n in ("alice", "bob", "carol"))
    signers = [SoftwareSigner(alice.key, "a.key"), SoftwareSigner(carol.key, "c.key")]
    pairing = pair_identities(signers, [("a.crt", alice.chain), ("b.crt", bob.chain)])
    assert [i.subject for i in pairing.identities] == ["CN=alice"]
    assert [s.uri for s in pairing.unmatched_keys] == ["c.key"]
    assert pairing.unmatched_certificates == ("b.crt",)


async def open_store(tmp_path: Path, key_stem: str, cert_stem: str) -> IdentityStore:
    ca = make_ca()
    issue(ca, "alice", client=True).write(tmp_path, "alice")
    issue(ca, "bob", client=True).write(tmp_path, "bob")
    return await IdentityStore.open(
        Registry.load(),
        [tmp_path / f"{key_stem}.key"],
        [tmp_path / f"{cert_stem}.crt"],
    )


@pytest.mark.anyio
async def test_store_loads_identity(tmp_path: Path) -> None:
    store = await open_store(tmp_path, "alice", "alice")
    identities = await store.load()
    assert [i.subject for i in identities] == ["CN=alice"]
    assert store.watch_paths() == [tmp_path / "alice.crt", tmp_path / "alice.key"]


@pytest.mark.anyio
async def test_no_match_names_both_sides(tmp_path: Path) -> None:
    store = await open_store(tmp_path, "alice", "bob")
    with pytest.raises(UserError) as caught:
        await store.load()
    assert str(tmp_path / "bob.crt") in str(caught.value)
    assert str(tmp_path / "alice.key") in str(caught.value)


@pytest.mark.anyio
async def test_unmatched_key_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = make_ca()
    issue(ca, "alice", client=True).write(tmp_path, "alice")
    issue(ca, "bob", client=True).write(tmp_path, "bob")
    store = await IdentityStore.open(
        Registry.load(),
        [tmp_path / "alice.key", tmp_path / "bob.key"],
        [tmp_path / "alice.crt"],
    )
    with caplog.at_level(logging.WARNING, logger="kmsproxy.identity"):
        await store.load()
    assert f"key={tmp_path / 'bob.key'}" in caplog.text


@pytest.mark.anyio
async def test_failed_reload_keeps_identities(tmp_path: Path) -> None:
    store = await open_store(tmp_path, "alice", "alice")
    await store.load()
    (tmp_path / "alice.crt").write_text("truncated")
    assert await store.reload("test") is False
    assert [i.subject for i in store.identities] == ["CN=alice"]


def test_no_key_is_user_error() -> None:
    with pytest.raises(UserError, match="--clientkey"):
        IdentityStore([], [])


@pytest.mark.anyio
async def test_valid_identity_first(tmp_path: Path) -> None:
    ca = make_ca()
    now = datetime.datetime.now(datetime.UTC)
    expired = issue(
        ca,
        "expired",
        client=True,
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    expired.write(tmp_path, "expired")
    issue(ca, "valid", client=True).write(tmp_path, "valid")
    store = await IdentityStore.open(
        Registry.load(),
        [tmp_path / "expired.key", tmp_path / "valid.key"],
        [tmp_path / "expired.crt", tmp_path / "valid.crt"],
    )
    await store.load()
    assert [i.subject for i in store.identities] == ["CN=valid", "CN=expired"]


def test_unsupported_leaf_key_unmatched() -> None:
    ca = make_ca()
    alice = issue(ca, "alice", client=True)
    signers = [SoftwareSigner(alice.key, "a.key")]
    pairing = pair_identities(signers, [("empty.crt", []), ("a.crt", alice.chain)])
    assert [i.subject for i in pairing.identities] == ["CN=alice"]
    assert pairing.unmatched_certificates == ("empty.crt",)


class ClosingSigner(SoftwareSigner):
    """A key that records whether it was closed."""

    closed = False

    async def aclose(self) -> None:
        self.closed = True


def closing_backend(opened: list[ClosingSigner]) -> types.ModuleType:
    """Build a backend for `closing:path=KEY` that records what it opens."""
    module = types.ModuleType("closing_backend")

    @hookimpl
    def kmsproxy_schemes() -> list[str]:
        return ["closing"]

    @hookimpl
    def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
        path = Path(uri.get("path") or "")
        signer = ClosingSigner(load_private_key(path), str(uri))
        opened.append(signer)
        return signer

    module.kmsproxy_schemes = kmsproxy_schemes  # type: ignore[attr-defined]
    module.kmsproxy_open_signer = kmsproxy_open_signer  # type: ignore[attr-defined]
    return module


@pytest.mark.anyio
async def test_failed_open_closes_opened_keys(tmp_path: Path) -> None:
    ca = make_ca()
    issue(ca, "alice", client=True).write(tmp_path, "alice")
    opened: list[ClosingSigner] = []
    registry = Registry.load([closing_backend(opened)])
    with pytest.raises(UserError, match=r"missing\.key"):
        await IdentityStore.open(
            registry,
            [f"closing:path={tmp_path / 'alice.key'}", tmp_path / "missing.key"],
            [tmp_path / "alice.crt"],
        )
    assert len(opened) == 1
    assert opened[0].closed is True


@pytest.mark.anyio
async def test_failed_open_leaves_given_signer(tmp_path: Path) -> None:
    ca = make_ca()
    alice = issue(ca, "alice", client=True)
    alice.write(tmp_path, "alice")
    given = ClosingSigner(alice.key, "alice.key")
    with pytest.raises(UserError, match=r"missing\.key"):
        await IdentityStore.open(
            Registry.load(), [given, tmp_path / "missing.key"], [tmp_path / "alice.crt"]
        )
    # A ready-made Signer belongs to the embedding program, so it stays open.
    assert given.closed is False


def test_valid_through_not_after() -> None:
    # RFC 5280: the validity period includes notAfter itself.
    not_after = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    issued = issue(make_ca(), "client", client=True, not_after=not_after)
    identity = Identity(
        tuple(issued.chain), SoftwareSigner(issued.key, "file:test"), "client.crt"
    )
    assert identity.is_valid_at(not_after)
    assert not identity.is_valid_at(not_after + datetime.timedelta(seconds=1))
