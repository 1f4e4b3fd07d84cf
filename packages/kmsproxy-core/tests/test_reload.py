"""Identity reloads: rename-replaced files, SIGHUP and certificate expiry."""

from __future__ import annotations

import datetime
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from pki import Issued, issue, make_ca

from kmsproxy.certificates import CertificateSource
from kmsproxy.identity import IdentityStore, KeySlot
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import SoftwareSigner

pytestmark = pytest.mark.anyio

# Upper bound for a reload to show up: the watch debounce is 0.3 s, so 10 s
# only matters on a badly overloaded machine.
RELOAD_WAIT_SECONDS = 10.0

# Seconds to let an event in a watched directory be handled alone: twice
# the 0.3 s watch debounce.
UNRELATED_EVENT_WAIT_SECONDS = 0.6

# Seconds to let the expiry task run once; far below EXPIRED_RETRY_SECONDS.
EXPIRY_CHECK_WAIT_SECONDS = 0.5

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def reissue(ca: Issued, previous: Issued, common_name: str) -> x509.Certificate:
    """Issue a new certificate for the key of `previous` (a renewal)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(previous.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(previous.cert.not_valid_before_utc)
        .not_valid_after(NOW + datetime.timedelta(days=1))
    )
    return builder.sign(ca.key, hashes.SHA256())


def rename_replace(path: Path, certificate: x509.Certificate) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    os.replace(temporary, path)


async def wait_for_subject(store: IdentityStore, subject: str) -> None:
    with anyio.fail_after(RELOAD_WAIT_SECONDS):
        while [i.subject for i in store.identities] != [subject]:
            await anyio.sleep(0.02)


async def test_rename_replace_twice(tmp_path: Path) -> None:
    ca = make_ca()
    first = issue(ca, "first", client=True)
    key_path, cert_path = first.write(tmp_path, "client")
    store = await IdentityStore.open(Registry.load(), [key_path], [cert_path])
    await store.load()
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        rename_replace(cert_path, reissue(ca, first, "second"))
        await wait_for_subject(store, "CN=second")
        rename_replace(cert_path, reissue(ca, first, "third"))
        await wait_for_subject(store, "CN=third")
        group.cancel_scope.cancel()
    assert store.reload_count >= 2


async def test_reload_log_names_watched_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = make_ca()
    first = issue(ca, "first", client=True)
    key_path, cert_path = first.write(tmp_path, "client")
    store = await IdentityStore.open(Registry.load(), [key_path], [cert_path])
    await store.load()
    temporary = tmp_path / f".{cert_path.name}.tmp"
    renewed = reissue(ca, first, "second")
    with caplog.at_level(logging.INFO, logger="kmsproxy.identity"):
        async with anyio.create_task_group() as group:
            await group.start(store.watch)
            # A renewal tool's write: a hidden temporary file, then a rename.
            temporary.write_bytes(renewed.public_bytes(serialization.Encoding.PEM))
            os.replace(temporary, cert_path)
            await wait_for_subject(store, "CN=second")
            group.cancel_scope.cancel()
    reloads = [m for m in caplog.messages if m.startswith("Reloaded identities")]
    assert reloads == [f"Reloaded identities reason=file changed ({cert_path}) count=1"]


async def test_bad_replace_keeps_identity(tmp_path: Path) -> None:
    ca = make_ca()
    first = issue(ca, "first", client=True)
    key_path, cert_path = first.write(tmp_path, "client")
    store = await IdentityStore.open(Registry.load(), [key_path], [cert_path])
    await store.load()
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        rename_replace(cert_path, issue(ca, "stranger", client=True).cert)
        with anyio.fail_after(RELOAD_WAIT_SECONDS):
            while store.failed_reload_count == 0:
                await anyio.sleep(0.02)
        assert [i.subject for i in store.identities] == ["CN=first"]
        rename_replace(cert_path, reissue(ca, first, "second"))
        await wait_for_subject(store, "CN=second")
        group.cancel_scope.cancel()


async def test_sighup_reloads(tmp_path: Path) -> None:
    ca = make_ca()
    first = issue(ca, "first", client=True)
    _, cert_path = first.write(tmp_path, "client")
    source = Registry.load().open_certificates(str(cert_path))

    class Unwatched(CertificateSource):
        uri = "unwatched"

        async def load(self) -> list[x509.Certificate]:
            return await source.load()

    store = IdentityStore([KeySlot(SoftwareSigner(first.key, "k"))], [Unwatched()])
    await store.load()
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        rename_replace(cert_path, reissue(ca, first, "second"))
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for_subject(store, "CN=second")
        group.cancel_scope.cancel()


class Sequenced(CertificateSource):
    """A source that returns the next chain on each load, never watched."""

    uri = "sequenced"

    def __init__(self, chains: Sequence[list[x509.Certificate]]) -> None:
        self.chains = list(chains)
        self.loads = 0

    async def load(self) -> list[x509.Certificate]:
        chain = self.chains[min(self.loads, len(self.chains) - 1)]
        self.loads += 1
        return chain


async def test_expiry_triggers_reload() -> None:
    ca = make_ca()
    now = datetime.datetime.now(datetime.UTC)
    expiring = issue(
        ca, "expiring", client=True, not_after=now + datetime.timedelta(seconds=2)
    )
    renewed = reissue(ca, expiring, "renewed")
    source = Sequenced([[expiring.cert], [renewed]])
    store = IdentityStore([KeySlot(SoftwareSigner(expiring.key, "k"))], [source])
    await store.load()
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        await wait_for_subject(store, "CN=renewed")
        group.cancel_scope.cancel()
    assert source.loads == 2


async def test_rotated_key_and_certificate(tmp_path: Path) -> None:
    ca = make_ca()
    first = issue(ca, "first", client=True)
    key_path, cert_path = first.write(tmp_path, "client")
    store = await IdentityStore.open(Registry.load(), [key_path], [cert_path])
    await store.load()
    rotated = issue(ca, "rotated", client=True)
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        # The key file changes first. A reload that runs before the
        # certificate follows finds no pair and keeps the first identity.
        new_key = tmp_path / "client.key.new"
        new_key.write_bytes(rotated.key_pem())
        os.replace(new_key, key_path)
        rename_replace(cert_path, rotated.cert)
        await wait_for_subject(store, "CN=rotated")
        group.cancel_scope.cancel()
    assert store.identities[0].signer.public_key() == rotated.key.public_key()


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


async def test_kubernetes_symlink_swap(tmp_path: Path) -> None:
    # The layout of a Kubernetes Secret volume: each file is a symlink into
    # `..data`, itself a symlink to a versioned directory that is swapped.
    ca = make_ca()
    first = issue(ca, "first", client=True)
    (tmp_path / "..v1").mkdir()
    first.write(tmp_path / "..v1", "client")
    (tmp_path / "..data").symlink_to("..v1")
    for name in ("client.crt", "client.key"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    store = await IdentityStore.open(
        Registry.load(), [tmp_path / "client.key"], [tmp_path / "client.crt"]
    )
    await store.load()
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        (tmp_path / "..v2").mkdir()
        (tmp_path / "..v2" / "client.key").write_bytes(first.key_pem())
        (tmp_path / "..v2" / "client.crt").write_bytes(
            pem(reissue(ca, first, "second"))
        )
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await wait_for_subject(store, "CN=second")
        group.cancel_scope.cancel()


async def test_parent_directory_replaced(tmp_path: Path) -> None:
    ca = make_ca()
    first = issue(ca, "first", client=True)
    directory = tmp_path / "certs"
    directory.mkdir()
    key_path, cert_path = first.write(directory, "client")
    store = await IdentityStore.open(Registry.load(), [key_path], [cert_path])
    await store.load()
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        directory.rename(tmp_path / "certs.old")
        directory.mkdir()
        key_path.write_bytes(first.key_pem())
        cert_path.write_bytes(pem(reissue(ca, first, "second")))
        await wait_for_subject(store, "CN=second")
        # The new directory is watched too.
        rename_replace(cert_path, reissue(ca, first, "third"))
        await wait_for_subject(store, "CN=third")
        group.cancel_scope.cancel()


async def test_unrelated_file_skips_reload(tmp_path: Path) -> None:
    ca = make_ca()
    first = issue(ca, "first", client=True)
    key_path, cert_path = first.write(tmp_path, "client")
    store = await IdentityStore.open(Registry.load(), [key_path], [cert_path])
    await store.load()
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        (tmp_path / "notes.txt").write_text("not a certificate")
        # Wait past the debounce, so the unrelated event is handled alone.
        await anyio.sleep(UNRELATED_EVENT_WAIT_SECONDS)
        rename_replace(cert_path, reissue(ca, first, "second"))
        await wait_for_subject(store, "CN=second")
        group.cancel_scope.cancel()
    assert store.reload_count == 1


class Gated(CertificateSource):
    """A source whose first load waits for `release`, as slow hardware may."""

    uri = "gated"

    def __init__(self, first: x509.Certificate, later: x509.Certificate) -> None:
        self.first = first
        self.later = later
        self.loads = 0
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.gate_next = False

    async def load(self) -> list[x509.Certificate]:
        self.loads += 1
        if self.gate_next:
            self.gate_next = False
            self.entered.set()
            await self.release.wait()
            return [self.first]
        return [self.later]


async def test_reloads_run_one_at_a_time() -> None:
    ca = make_ca()
    first = issue(ca, "first", client=True)
    older, newer = reissue(ca, first, "older"), reissue(ca, first, "newer")
    source = Gated(older, newer)
    store = IdentityStore([KeySlot(SoftwareSigner(first.key, "k"))], [source])
    await store.load()
    source.gate_next = True
    with anyio.fail_after(RELOAD_WAIT_SECONDS):
        async with anyio.create_task_group() as group:
            group.start_soon(store.reload, "slow")
            await source.entered.wait()
            group.start_soon(store.reload, "fast")
            # Let the second reload run as far as it can before the first ends.
            for _ in range(10):
                await anyio.sleep(0)
            source.release.set()
    assert [i.subject for i in store.identities] == ["CN=newer"]
    assert store.reload_count == 2


class Failing(CertificateSource):
    """A source that loads once, then raises what a faulty plugin might."""

    uri = "failing"

    def __init__(self, chain: list[x509.Certificate]) -> None:
        self.chain = chain
        self.loads = 0

    async def load(self) -> list[x509.Certificate]:
        self.loads += 1
        if self.loads > 1:
            raise RuntimeError("device unplugged")
        return self.chain


async def test_backend_exception_keeps_identity(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = issue(make_ca(), "first", client=True)
    store = IdentityStore(
        [KeySlot(SoftwareSigner(first.key, "k"))], [Failing([first.cert])]
    )
    await store.load()
    assert await store.reload("test") is False
    assert [i.subject for i in store.identities] == ["CN=first"]
    assert store.failed_reload_count == 1
    assert "error_type=RuntimeError" in caplog.text


class Closing(SoftwareSigner):
    """A signer that records `aclose`."""

    closed = 0

    async def aclose(self) -> None:
        self.closed += 1


async def test_replaced_signer_closed() -> None:
    first = issue(make_ca(), "first", client=True)
    opened: list[Closing] = []

    def reopen() -> Closing:
        opened.append(Closing(first.key, f"k{len(opened)}"))
        return opened[-1]

    initial = Closing(first.key, "initial")
    slot = KeySlot(initial, Path("k"), reopen)
    store = IdentityStore([slot], [Sequenced([[first.cert]])])
    await store.load()
    assert initial.closed == 1
    assert await store.reload("test")
    assert [s.closed for s in opened] == [1, 0]
    await store.aclose()
    assert [s.closed for s in opened] == [1, 1]


async def test_failed_reload_closes_new_signer() -> None:
    first = issue(make_ca(), "first", client=True)
    opened: list[Closing] = []

    def reopen() -> Closing:
        opened.append(Closing(first.key, f"k{len(opened)}"))
        return opened[-1]

    slot = KeySlot(Closing(first.key, "initial"), Path("k"), reopen)
    store = IdentityStore([slot], [Failing([first.cert])])
    await store.load()
    assert await store.reload("test") is False
    assert [s.closed for s in opened] == [0, 1]
    assert slot.signer is opened[0]


async def test_ready_signer_not_closed() -> None:
    first = issue(make_ca(), "first", client=True)
    ready = Closing(first.key, "ready")
    store = IdentityStore([KeySlot(ready, owned=False)], [Sequenced([[first.cert]])])
    await store.load()
    await store.aclose()
    assert ready.closed == 0


async def test_expired_at_start_not_reloaded() -> None:
    ca = make_ca()
    now = datetime.datetime.now(datetime.UTC)
    expired = issue(
        ca,
        "expired",
        client=True,
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    source = Sequenced([[expired.cert]])
    store = IdentityStore([KeySlot(SoftwareSigner(expired.key, "k"))], [source])
    await store.load()
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        # Long enough for the expiry task to run; short of the retry delay.
        await anyio.sleep(EXPIRY_CHECK_WAIT_SECONDS)
        group.cancel_scope.cancel()
    assert source.loads == 1
    assert store.reload_count == 0
