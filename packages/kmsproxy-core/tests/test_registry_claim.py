"""Key files that a backend claims by their format, before the file backend.

A fake backend claims files that start with its own PEM label and opens
them under its `fakekms:` scheme; every other file keeps going to the file
backend, with its errors unchanged.
"""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from pki import generate_key, issue, make_ca
from special_files import SPECIAL_FILE_TIMEOUT_SECONDS

from kmsproxy.certificates import CertificateSource
from kmsproxy.plugins import file as file_backend
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import KEY_FILE_HEAD_BYTES, Registry
from kmsproxy.signer import Signer, SignerError, SoftwareSigner
from kmsproxy.uri import KeyURI

FAKE_SCHEME = "fakekms"
FAKE_LABEL = b"-----BEGIN FAKE PRIVATE KEY-----"


class FakeChain(CertificateSource):
    """An empty chain that records which path it was opened for."""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def uri(self) -> str:
        return f"{FAKE_SCHEME}:path={self.path}"

    async def load(self) -> list[x509.Certificate]:
        return []


class FakeBackend:
    """A backend that claims files starting with `FAKE_LABEL`.

    `heads` records the `head` of every file it was offered.
    """

    def __init__(self) -> None:
        self.key = generate_key("p256")
        self.heads: list[bytes] = []

    @hookimpl
    def kmsproxy_schemes(self) -> list[str]:
        return [FAKE_SCHEME]

    @hookimpl
    def kmsproxy_claim_key_file(self, path: Path, head: bytes) -> str | None:
        self.heads.append(head)
        if not head.startswith(FAKE_LABEL):
            return None
        return f"{FAKE_SCHEME}:path={quote(str(path))}"

    @hookimpl
    def kmsproxy_open_signer(self, uri: KeyURI) -> Signer | None:
        if uri.scheme != FAKE_SCHEME:
            return None
        return SoftwareSigner(self.key, f"{FAKE_SCHEME}:path={uri.get('path')}")

    @hookimpl
    def kmsproxy_open_certificates(self, uri: KeyURI) -> CertificateSource | None:
        if uri.scheme != FAKE_SCHEME:
            return None
        return FakeChain(uri.get("path") or "")


def registry_with(*plugins: object) -> Registry:
    """Load the file backend and `plugins` only, whatever else is installed."""
    return Registry.load([file_backend, *plugins], entry_points=False)


def fake_key_file(path: Path) -> Path:
    path.write_bytes(FAKE_LABEL + b"\nopaque blob\n-----END FAKE PRIVATE KEY-----\n")
    return path


def test_claimed_key_opens_in_backend(tmp_path: Path) -> None:
    backend = FakeBackend()
    path = fake_key_file(tmp_path / "client.pem")
    signer = registry_with(backend).open_signer(str(path))
    assert signer.public_key() == backend.key.public_key()
    assert signer.uri == f"{FAKE_SCHEME}:path={path}"


def test_claim_receives_file_head(tmp_path: Path) -> None:
    backend = FakeBackend()
    path = fake_key_file(tmp_path / "client.pem")
    registry_with(backend).resolve(str(path))
    assert backend.heads == [path.read_bytes()]


def test_claim_head_is_bounded(tmp_path: Path) -> None:
    backend = FakeBackend()
    path = tmp_path / "large.pem"
    path.write_bytes(FAKE_LABEL + b"x" * (2 * KEY_FILE_HEAD_BYTES))
    registry_with(backend).resolve(str(path))
    assert [len(head) for head in backend.heads] == [KEY_FILE_HEAD_BYTES]


def test_claimed_path_is_percent_encoded(tmp_path: Path) -> None:
    directory = tmp_path / "a;b?c=d%20"
    directory.mkdir()
    path = fake_key_file(directory / "client.pem")
    uri = registry_with(FakeBackend()).resolve(str(path))
    assert uri.scheme == FAKE_SCHEME
    assert uri.get("path") == str(path)


def test_tilde_path_is_claimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = fake_key_file(tmp_path / "client.pem")
    uri = registry_with(FakeBackend()).resolve("~/client.pem")
    assert uri.get("path") == str(path)


def test_claimed_certificate_argument(tmp_path: Path) -> None:
    path = fake_key_file(tmp_path / "client.pem")
    source = registry_with(FakeBackend()).open_certificates(str(path))
    assert isinstance(source, FakeChain)
    assert source.path == str(path)


def test_unclaimed_key_goes_to_file_backend(tmp_path: Path) -> None:
    backend = FakeBackend()
    issued = issue(make_ca(), "client", client=True)
    key_path, _ = issued.write(tmp_path, "client")
    signer = registry_with(backend).open_signer(str(key_path))
    assert signer.public_key() == issued.key.public_key()
    assert len(backend.heads) == 1


def test_unclaimed_garbage_keeps_file_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.key"
    path.write_bytes(b"-----BEGIN OTHER PRIVATE KEY-----\nnot a key\n")
    with pytest.raises(SignerError, match=r"garbage\.key: not a PEM or DER"):
        registry_with(FakeBackend()).open_signer(str(path))


def test_directory_is_not_offered(tmp_path: Path) -> None:
    backend = FakeBackend()
    uri = registry_with(backend).resolve(str(tmp_path))
    assert uri.scheme == "file"
    assert backend.heads == []


def raising_backend() -> types.ModuleType:
    module = types.ModuleType("raising")

    @hookimpl
    def kmsproxy_schemes() -> list[str]:
        return ["raising"]

    @hookimpl
    def kmsproxy_claim_key_file(path: Path) -> str | None:
        raise RuntimeError(f"cannot look at {path.name}")

    module.kmsproxy_schemes = kmsproxy_schemes  # type: ignore[attr-defined]
    module.kmsproxy_claim_key_file = kmsproxy_claim_key_file  # type: ignore[attr-defined]
    return module


def returning_backend(result: object) -> types.ModuleType:
    module = types.ModuleType("returning")

    @hookimpl
    def kmsproxy_schemes() -> list[str]:
        return ["returning"]

    @hookimpl
    def kmsproxy_claim_key_file(head: bytes) -> object:
        return result

    module.kmsproxy_schemes = kmsproxy_schemes  # type: ignore[attr-defined]
    module.kmsproxy_claim_key_file = kmsproxy_claim_key_file  # type: ignore[attr-defined]
    return module


def test_raising_claim_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim hook that raises is logged, and the next backend still claims."""
    backend = FakeBackend()
    path = fake_key_file(tmp_path / "client.pem")
    registry = registry_with(backend, raising_backend())
    with caplog.at_level(logging.WARNING, logger="kmsproxy.plugins.registry"):
        uri = registry.resolve(str(path))
    assert uri.scheme == FAKE_SCHEME
    assert "Key file claim failed backend=raising" in caplog.text
    assert "cannot look at client.pem" in caplog.text


def test_raising_claim_keeps_file_keys(tmp_path: Path) -> None:
    issued = issue(make_ca(), "client", client=True)
    key_path, _ = issued.write(tmp_path, "client")
    signer = registry_with(raising_backend()).open_signer(str(key_path))
    assert signer.public_key() == issued.key.public_key()


@pytest.mark.parametrize("result", [b"fakekms:path=/x", "not a uri", 42])
def test_bad_claim_result_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, result: object
) -> None:
    issued = issue(make_ca(), "client", client=True)
    key_path, _ = issued.write(tmp_path, "client")
    with caplog.at_level(logging.WARNING, logger="kmsproxy.plugins.registry"):
        uri = registry_with(returning_backend(result)).resolve(str(key_path))
    assert uri.scheme == "file"
    assert "Key file claim failed backend=returning" in caplog.text


def test_claimed_uri_redacts_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A claimed URI is logged redacted, like any other URI."""
    path = fake_key_file(tmp_path / "client.pem")
    backend = returning_backend(f"{FAKE_SCHEME}:path={path};pin-value=1234")
    with caplog.at_level(logging.DEBUG, logger="kmsproxy.plugins.registry"):
        uri = registry_with(FakeBackend(), backend).resolve(str(path))
    assert uri.get("pin-value") == "1234"
    assert "Key file claimed backend=returning" in caplog.text
    assert "1234" not in caplog.text


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
def test_fifo_swapped_in_is_not_offered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path checked as a regular file and then replaced by a FIFO without
    a writer: `is_file` returning True plays the check that came first."""
    backend = FakeBackend()
    fifo = tmp_path / "client.pem"
    os.mkfifo(fifo)
    monkeypatch.setattr(Path, "is_file", lambda self: True)
    with pytest.raises(SignerError, match="not a regular file"):
        registry_with(backend).open_signer(str(fifo))
    assert backend.heads == []
