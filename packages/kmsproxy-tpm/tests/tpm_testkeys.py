"""Keys for the TPM backend's tests: made in swtpm by the real CLI.

`key_directory` points XDG_CONFIG_HOME at the test's temporary directory,
so `kmsproxy tpm create` and `kmsproxy init` write there. `create_key` and
`create_ca_certificate` run the CLI in this process; `open_signer` opens a
URI through the real registry and entry point.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from swtpm_emulator import Swtpm
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPM2_HC, TPM2_RC
from tpm2_pytss.types import TPM2B_PUBLIC

from kmsproxy.cli import main
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import Signer

# More handles than swtpm can hold (3 transient objects in libtpms 0.9).
MAX_LISTED_HANDLES = 16


@pytest.fixture
def key_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the key directory at the test's temporary directory."""
    config = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    return config / "kmsproxy" / "tpm"


def create_key(swtpm: Swtpm, name: str, *options: str) -> str:
    """Create a key with `kmsproxy tpm create`; return its URI."""
    status = main(["tpm", "create", name, "--tcti", swtpm.tcti, *options])
    assert status == 0, f"kmsproxy tpm create {name} {' '.join(options)} failed"
    return key_uri(swtpm, name)


def key_uri(swtpm: Swtpm, name: str, extra: str = "") -> str:
    return f"tpmkms:name={name};tcti={swtpm.tcti}{extra}"


@asynccontextmanager
async def open_signer(uri: str) -> AsyncIterator[Signer]:
    """Open `uri` through the installed entry points; close it afterwards.

    Closing matters: swtpm serves one connection at a time, and without a
    resource manager it keeps loaded keys until they are flushed.
    """
    signer = Registry.load().open_signer(uri)
    try:
        yield signer
    finally:
        await signer.aclose()


async def create_ca_certificate(key: str, directory: Path) -> Path:
    """Sign a CA certificate for `key` with `kmsproxy init --key`; return it.

    The command runs its own event loop, so it runs in a worker thread.
    """
    arguments = ["init", "--key", key, "--dir", str(directory)]
    status = await anyio.to_thread.run_sync(main, arguments)
    assert status == 0, f"kmsproxy init --key {key} failed"
    return directory / "ca.crt"


def write_chain(path: Path, chain: list[x509.Certificate]) -> Path:
    path.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    )
    return path


def transient_handles(swtpm: Swtpm) -> list[int]:
    """Return the TPM's loaded transient objects.

    swtpm has no resource manager, so an object that kmsproxy loaded and
    never flushed stays here until the TPM restarts.
    """
    with ESAPI(swtpm.tcti) as esapi:
        _, data = esapi.get_capability(
            TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, MAX_LISTED_HANDLES
        )
        return [int(handle) for handle in data.data.handles]


@contextmanager
def object_slots_filled(swtpm: Swtpm) -> Iterator[None]:
    """Load primary keys into swtpm until it has no free object slot.

    This is what other programs leave behind on a TPM without a resource
    manager. The keys are flushed on exit.
    """
    with ESAPI(swtpm.tcti) as esapi:
        handles = []
        try:
            for _ in range(MAX_LISTED_HANDLES):
                try:
                    handle, *_ = esapi.create_primary(
                        None, TPM2B_PUBLIC.parse("ecc256"), ESYS_TR.OWNER
                    )
                except TSS2_Exception as error:
                    if error.error != TPM2_RC.OBJECT_MEMORY:
                        raise
                    break
                handles.append(handle)
            else:
                raise AssertionError(f"swtpm loaded {MAX_LISTED_HANDLES} objects")
            yield
        finally:
            for handle in handles:
                esapi.flush_context(handle)
