"""Key, certificate and password files that are not what they claim to be.

A FIFO without a writer, /dev/zero and an oversized file each give an error
at once, instead of a read that blocks or fills the memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pki import make_ca

from kmsproxy.certificates import CertificateError
from kmsproxy.files import read_file_head, read_small_file
from kmsproxy.identity import _fingerprint_files
from kmsproxy.plugins.file import load_certificates
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import SignerError


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "chain.crt"
    os.mkfifo(path)
    return path


def test_fifo_is_not_regular(fifo: Path) -> None:
    with pytest.raises(OSError, match="not a regular file"):
        read_small_file(fifo, 100)


def test_device_is_not_regular() -> None:
    with pytest.raises(OSError, match="not a regular file"):
        read_small_file("/dev/zero", 100)


def test_file_over_limit(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    with pytest.raises(OSError, match="larger than 100 bytes"):
        read_small_file(path, 100)


def test_file_at_limit(tmp_path: Path) -> None:
    path = tmp_path / "exact"
    path.write_bytes(b"x" * 100)
    assert read_small_file(path, 100) == b"x" * 100


def test_nul_in_path() -> None:
    with pytest.raises(OSError, match="NUL byte"):
        read_small_file("/tmp/a\x00b", 100)


def test_fifo_chain_is_certificate_error(fifo: Path) -> None:
    with pytest.raises(CertificateError, match=r"chain\.crt: cannot read certificate"):
        load_certificates(fifo)


def test_fifo_fingerprint_is_unreadable(fifo: Path) -> None:
    ((_, _, digest),) = _fingerprint_files([fifo])
    assert digest == "unreadable: not a regular file"


def test_password_file_device(tmp_path: Path) -> None:
    key, _ = make_ca().write(tmp_path, "ca")
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(f"file:path={key};password-file=/dev/zero")
    assert str(raised.value).endswith(
        "cannot read password-file /dev/zero: not a regular file"
    )


def test_head_of_larger_file(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    assert read_file_head(path, 100) == b"x" * 100


def test_head_of_fifo_is_not_regular(fifo: Path) -> None:
    with pytest.raises(OSError, match="not a regular file"):
        read_file_head(fifo, 100)


def test_open_without_controlling_tty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A terminal named by mistake must not become the proxy's controlling
    terminal, so every open passes O_NOCTTY."""
    flags: list[int] = []
    real_open = os.open

    def recording_open(path: str, mode: int, *args: int) -> int:
        flags.append(mode)
        return real_open(path, mode, *args)

    monkeypatch.setattr(os, "open", recording_open)
    path = tmp_path / "small"
    path.write_bytes(b"x")
    read_small_file(path, 100)
    read_file_head(path, 100)
    assert len(flags) == 2
    assert all(mode & os.O_NOCTTY for mode in flags)


def test_key_file_as_certificate(tmp_path: Path) -> None:
    # The Go form reads the chain from KMSURI, so a key-only file lands here.
    path = tmp_path / "client.key"
    path.write_bytes(make_ca().key_pem())
    with pytest.raises(CertificateError) as raised:
        load_certificates(path)
    assert str(raised.value) == f"{path}: contains a private key but no certificate"
