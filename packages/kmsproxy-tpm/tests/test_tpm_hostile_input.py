"""Hostile local input to the TPM backend: auth value files and key names.

None of these reach a TPM: each is rejected while the URI or the command
line is read, so the TCTI names a closed loopback port.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from special_files import (
    SPECIAL_CASES,
    SPECIAL_FILE_TIMEOUT_SECONDS,
    special_file,
    uri_value,
)
from tpm_testkeys import key_directory

from kmsproxy.certificates import CertificateError
from kmsproxy.cli import main
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import SignerError
from kmsproxy.uri import KeyURI
from kmsproxy_tpm import storage
from kmsproxy_tpm.certificates import TPMChainSource
from kmsproxy_tpm.keyblob import KeyFileError, read_key_file
from kmsproxy_tpm.reference import KeyReference, parse_reference

__all__ = ["key_directory"]

# Nothing listens on port 1, and no test here gets as far as connecting.
CLOSED_TCTI = "swtpm:host=127.0.0.1,port=1"


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
@pytest.mark.parametrize("case", sorted(SPECIAL_CASES))
def test_pin_source_special_file(
    key_directory: Path, tmp_path: Path, case: str
) -> None:
    source = uri_value(special_file(case, tmp_path))
    uri = KeyURI.parse(f"tpmkms:name=k;tcti={CLOSED_TCTI};pin-source={source}")
    with pytest.raises(SignerError) as raised:
        parse_reference(uri)
    message = str(raised.value)
    assert message.startswith("tpmkms:name=k;")
    assert "cannot read the auth value file" in message
    assert message.endswith(f": {SPECIAL_CASES[case]}")


def test_pin_source_first_line(key_directory: Path, tmp_path: Path) -> None:
    source = tmp_path / "auth"
    source.write_bytes(b"auth-4711\nignored\n")
    uri = KeyURI.parse(f"tpmkms:name=k;tcti={CLOSED_TCTI};pin-source={source}")
    reference = parse_reference(uri)
    assert reference.auth == b"auth-4711"
    assert "auth-4711" not in repr(reference)


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
def test_create_pin_source_fifo(
    key_directory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = special_file("fifo", tmp_path)
    status = main(
        ["tpm", "create", "k", "--tcti", CLOSED_TCTI, "--pin-source", str(fifo)]
    )
    error = capsys.readouterr().err
    assert status == 2
    assert f"cannot read the auth value file {fifo}: not a regular file" in error


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
@pytest.mark.parametrize("case", ["fifo", "zero"])
def test_chain_special_file(tmp_path: Path, case: str) -> None:
    key_path = tmp_path / "k.pem"
    reference = KeyReference("tpmkms:name=k", key_path, CLOSED_TCTI, name="k")
    special_file(case, tmp_path).rename(reference.chain_path)
    with pytest.raises(CertificateError) as raised:
        anyio.run(TPMChainSource(reference).load)
    message = str(raised.value)
    assert message.startswith(f"tpmkms:name=k: {reference.chain_path}: ")
    assert message.endswith(": not a regular file")


@pytest.mark.timeout(SPECIAL_FILE_TIMEOUT_SECONDS)
@pytest.mark.parametrize("case", ["fifo", "zero"])
def test_key_file_special(tmp_path: Path, case: str) -> None:
    path = special_file(case, tmp_path)
    with pytest.raises(KeyFileError, match=f"cannot read {path}: not a regular file"):
        read_key_file(path)


def test_name_with_newline_rejected() -> None:
    with pytest.raises(ValueError, match=r"invalid key name 'evil\\n'"):
        storage.check_name("evil\n")


def test_create_name_with_newline(
    key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["tpm", "create", "evil\n", "--tcti", CLOSED_TCTI])
    error = capsys.readouterr().err
    assert status == 2
    assert r"invalid key name 'evil\n'" in error
    assert not key_directory.exists() or not list(key_directory.iterdir())


def test_uri_name_with_newline(key_directory: Path) -> None:
    with pytest.raises(SignerError, match=r"invalid key name 'evil\\n'"):
        Registry.load().open_signer(f"tpmkms:name=evil%0A;tcti={CLOSED_TCTI}")


def test_list_skips_name_with_newline(key_directory: Path) -> None:
    key_directory.mkdir(parents=True)
    (key_directory / "evil\n.pem").write_bytes(b"")
    (key_directory / "good.pem").write_bytes(b"")
    assert storage.key_names() == ["good"]


# An auth value after `&` where `?` belongs, or followed by a bare `;` in the
# query part: the URI is rejected before the value reaches the TPM.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"tpmkms:name=mykey-pin;tcti={CLOSED_TCTI}&pin-value=654321",
            "attribute 2 of 2 contains '&pin-value='",
        ),
        (
            f"tpmkms:name=mykey-pin&pin-value=654321;tcti={CLOSED_TCTI}",
            "attribute 1 of 2 contains '&pin-value='",
        ),
        (
            f"tpmkms:name=mykey-pin;tcti={CLOSED_TCTI}?pin-value=654321;21",
            "attribute 3 of 3 contains an unencoded ';'",
        ),
    ],
)
def test_auth_value_typo_hidden(
    key_directory: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    status = main(["csr", text, "--subject", "CN=x"])
    error = capsys.readouterr().err
    assert status == 2
    assert expected in error
    assert "654321" not in error
    assert error.count("\n") == 1
