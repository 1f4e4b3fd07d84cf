"""Keys for the TPM backend's tests: made in swtpm by the real CLI.

`key_directory` points XDG_CONFIG_HOME at the test's temporary directory,
so `kmsproxy tpm create` and `kmsproxy init` write there. `create_key` and
`create_ca_certificate` run the CLI in this process; `open_signer` opens a
URI through the real registry and entry point.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from swtpm_emulator import Swtpm
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_HC

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
