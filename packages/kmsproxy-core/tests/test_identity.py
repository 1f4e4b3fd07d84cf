"""Pairing client keys with certificate chains."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import anyio
import pytest
from pki import issue, make_ca

from kmsproxy.errors import UserError
from kmsproxy.identity import IdentityStore, pair_identities
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import SoftwareSigner


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


def open_store(tmp_path: Path, key_stem: str, cert_stem: str) -> IdentityStore:
    ca = make_ca()
    issue(ca, "alice", client=True).write(tmp_path, "alice")
    issue(ca, "bob", client=True).write(tmp_path, "bob")
    return IdentityStore.open(
        Registry.load(),
        [tmp_path / f"{key_stem}.key"],
        [tmp_path / f"{cert_stem}.crt"],
    )


def test_store_loads_identity(tmp_path: Path) -> None:
    store = open_store(tmp_path, "alice", "alice")
    identities = anyio.run(store.load)
    assert [i.subject for i in identities] == ["CN=alice"]
    assert store.watch_paths() == [tmp_path / "alice.crt", tmp_path / "alice.key"]


def test_no_match_names_both_sides(tmp_path: Path) -> None:
    store = open_store(tmp_path, "alice", "bob")
    with pytest.raises(UserError) as caught:
        anyio.run(store.load)
    assert str(tmp_path / "bob.crt") in str(caught.value)
    assert str(tmp_path / "alice.key") in str(caught.value)


def test_unmatched_key_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = make_ca()
    issue(ca, "alice", client=True).write(tmp_path, "alice")
    issue(ca, "bob", client=True).write(tmp_path, "bob")
    store = IdentityStore.open(
        Registry.load(),
        [tmp_path / "alice.key", tmp_path / "bob.key"],
        [tmp_path / "alice.crt"],
    )
    with caplog.at_level(logging.WARNING, logger="kmsproxy.identity"):
        anyio.run(store.load)
    assert f"key={tmp_path / 'bob.key'}" in caplog.text


def test_failed_reload_keeps_identities(tmp_path: Path) -> None:
    store = open_store(tmp_path, "alice", "alice")

    async def main() -> bool:
        await store.load()
        (tmp_path / "alice.crt").write_text("truncated")
        return await store.reload("test")

    assert anyio.run(main) is False
    assert [i.subject for i in store.identities] == ["CN=alice"]


def test_no_key_is_user_error() -> None:
    with pytest.raises(UserError, match="--clientkey"):
        IdentityStore([], [])


def test_valid_identity_first(tmp_path: Path) -> None:
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
    store = IdentityStore.open(
        Registry.load(),
        [tmp_path / "expired.key", tmp_path / "valid.key"],
        [tmp_path / "expired.crt", tmp_path / "valid.crt"],
    )
    anyio.run(store.load)
    assert [i.subject for i in store.identities] == ["CN=valid", "CN=expired"]


def test_unsupported_leaf_key_unmatched() -> None:
    ca = make_ca()
    alice = issue(ca, "alice", client=True)
    signers = [SoftwareSigner(alice.key, "a.key")]
    pairing = pair_identities(signers, [("empty.crt", []), ("a.crt", alice.chain)])
    assert [i.subject for i in pairing.identities] == ["CN=alice"]
    assert pairing.unmatched_certificates == ("empty.crt",)
