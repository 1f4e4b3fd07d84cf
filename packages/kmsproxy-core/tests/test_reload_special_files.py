"""A watched key or chain path replaced by a FIFO, /dev/zero or a huge file.

Each read fails at once with a one-line reason, the reload that follows
keeps the previous identity, and a valid file put back later reloads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import pytest
from pki import issue, make_ca
from special_files import SPECIAL_FILE_TIMEOUT_SECONDS, special_file
from test_reload import RELOAD_WAIT_SECONDS, reissue, rename_replace, wait_for_subject

from kmsproxy.certificates import CertificateError
from kmsproxy.files import MAX_KEY_FILE_BYTES
from kmsproxy.identity import IdentityStore
from kmsproxy.plugins.file import load_certificates, load_private_key
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import SignerError

# The chain cases and the reason each read must fail with. "huge" is a
# sparse file just over the key and chain limit.
CHAIN_CASES = {
    "fifo": "not a regular file",
    "zero": "not a regular file",
    "huge": f"larger than {MAX_KEY_FILE_BYTES} bytes",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_special(case: str, directory: Path) -> Path:
    if case == "huge":
        path = directory / "huge"
        with path.open("wb") as file:
            file.truncate(MAX_KEY_FILE_BYTES + 1)
        return path
    return special_file(case, directory)


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
@pytest.mark.parametrize("case", sorted(CHAIN_CASES))
def test_chain_special_file(tmp_path: Path, case: str) -> None:
    path = make_special(case, tmp_path)
    with pytest.raises(CertificateError) as raised:
        load_certificates(path)
    assert str(raised.value) == f"{path}: cannot read certificate: {CHAIN_CASES[case]}"


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
@pytest.mark.parametrize("case", sorted(CHAIN_CASES))
def test_key_special_file(tmp_path: Path, case: str) -> None:
    path = make_special(case, tmp_path)
    with pytest.raises(SignerError) as raised:
        load_private_key(path)
    assert str(raised.value) == f"{path}: cannot read key: {CHAIN_CASES[case]}"


@pytest.mark.anyio
@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS + RELOAD_WAIT_SECONDS)
@pytest.mark.parametrize("case", sorted(CHAIN_CASES))
async def test_watched_chain_replaced(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    ca = make_ca()
    first = issue(ca, "first", client=True)
    key_path, cert_path = first.write(tmp_path, "client")
    store = await IdentityStore.open(Registry.load(), [key_path], [cert_path])
    await store.load()
    caplog.set_level(logging.WARNING, logger="kmsproxy.identity")
    async with anyio.create_task_group() as group:
        await group.start(store.watch)
        (tmp_path / "new").mkdir()
        os.replace(make_special(case, tmp_path / "new"), cert_path)
        with anyio.fail_after(RELOAD_WAIT_SECONDS):
            while store.failed_reload_count == 0:
                await anyio.sleep(0.02)
        assert [i.subject for i in store.identities] == ["CN=first"]
        assert f"cannot read certificate: {CHAIN_CASES[case]}" in caplog.text
        rename_replace(cert_path, reissue(ca, first, "second"))
        await wait_for_subject(store, "CN=second")
        group.cancel_scope.cancel()
