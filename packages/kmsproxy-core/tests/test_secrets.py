"""Secret files: only the first line of a small regular file, never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pki import make_ca
from special_files import (
    SPECIAL_CASES,
    SPECIAL_FILE_TIMEOUT_SECONDS,
    special_file,
    uri_value,
)

from kmsproxy.plugins.registry import Registry
from kmsproxy.secrets import MAX_SECRET_FILE_BYTES, SecretFileError, read_secret_file
from kmsproxy.signer import SignerError

SECRET = b"s3cret-4711"


def test_first_line_only(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(SECRET + b"\r\nsecond line\n")
    assert read_secret_file(path, "pin-source") == SECRET


def test_empty_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(b"")
    assert read_secret_file(path, "pin-source") == b""


def test_at_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(b"x" * MAX_SECRET_FILE_BYTES)
    assert len(read_secret_file(path, "pin-source")) == MAX_SECRET_FILE_BYTES


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    with pytest.raises(SecretFileError) as raised:
        read_secret_file(path, "pin-source")
    assert (
        str(raised.value) == f"cannot read pin-source {path}: No such file or directory"
    )


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
@pytest.mark.parametrize("case", sorted(SPECIAL_CASES))
def test_special_file_rejected(tmp_path: Path, case: str) -> None:
    path = special_file(case, tmp_path)
    with pytest.raises(SecretFileError) as raised:
        read_secret_file(path, "pin-source")
    message = str(raised.value)
    assert message.endswith(f": {SPECIAL_CASES[case]}")
    assert "\n" not in message
    assert "\x00" not in message


def test_over_limit_hides_content(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(SECRET * (MAX_SECRET_FILE_BYTES // len(SECRET) + 1))
    with pytest.raises(SecretFileError) as raised:
        read_secret_file(path, "pin-source")
    assert SECRET.decode() not in str(raised.value)


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
@pytest.mark.parametrize("case", sorted(SPECIAL_CASES))
def test_password_file_special(tmp_path: Path, case: str) -> None:
    key, _ = make_ca().write(tmp_path, "ca")
    password_file = uri_value(special_file(case, tmp_path))
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(f"file:path={key};password-file={password_file}")
    message = str(raised.value)
    assert message.startswith(f"file:path={key};password-file=")
    assert message.endswith(f": {SPECIAL_CASES[case]}")
