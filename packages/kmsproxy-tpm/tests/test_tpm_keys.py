"""TPM keys in swtpm: creation, signatures, the key directory, and errors."""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pki import certify, generate_key, make_ca
from swtpm_emulator import Swtpm, swtpm_module
from tpm2_pytss.constants import TPMA_OBJECT
from tpm_busy_peer import busy_tpm
from tpm_testkeys import (
    create_key,
    key_directory,
    key_uri,
    object_slots_filled,
    open_signer,
    transient_handles,
    write_chain,
)

from kmsproxy.backoff import Backoff
from kmsproxy.cli import main
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import (
    BlockingSigner,
    SignatureScheme,
    Signer,
    SignerError,
    schemes_for_public_key,
    verify_signature,
)
from kmsproxy_tpm import device as devices
from kmsproxy_tpm.device import TPMDevice
from kmsproxy_tpm.keyblob import read_key_file

__all__ = ["key_directory", "swtpm_module"]

pytestmark = pytest.mark.anyio

# Bound on waiting for the tpm-reconnect backoff (0.5 s, then 1 s, ...) to
# let a signature through after swtpm restarts.
BACKOFF_WAIT_SECONDS = 20.0
BACKOFF_POLL_SECONDS = 0.1

# Runs of create, csr and list against one swtpm; more than its 3 slots.
ROUNDS_OF_COMMANDS = 5

# The device wait in the hung-TPM test, and the bound on its threads.
HUNG_WAIT_SECONDS = 0.5
HUNG_THREAD_SECONDS = 10.0

MESSAGE = b"TLS 1.3, client CertificateVerify\x00" + bytes(range(64))

# Every scheme a software RSA key offers: swtpm signs with all six.
ALL_RSA_SCHEMES = set(schemes_for_public_key(generate_key("rsa2048").public_key()))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("options", "description", "schemes"),
    [
        ((), "EC P-256", {SignatureScheme.ecdsa_secp256r1_sha256}),
        (("--curve", "P-384"), "EC P-384", {SignatureScheme.ecdsa_secp384r1_sha384}),
        (("--kty", "RSA"), "RSA 2048", ALL_RSA_SCHEMES),
        (("--kty", "RSA", "--size", "3072"), "RSA 3072", ALL_RSA_SCHEMES),
    ],
    ids=["p256", "p384", "rsa2048", "rsa3072"],
)
async def test_created_key_signs_each_scheme(
    swtpm_module: Swtpm,
    key_directory: Path,
    options: tuple[str, ...],
    description: str,
    schemes: set[SignatureScheme],
) -> None:
    uri = create_key(swtpm_module, "client", *options)
    async with open_signer(uri) as signer:
        assert set(signer.schemes) == schemes
        assert getattr(signer, "description", None) == description
        for scheme in signer.schemes:
            signature = await signer.sign(MESSAGE, scheme)
            verify_signature(signer.public_key(), signature, MESSAGE, scheme)


async def test_open_signer_holds_no_tpm_object(
    swtpm_module: Swtpm, key_directory: Path
) -> None:
    uri = create_key(swtpm_module, "client")
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    async with open_signer(uri) as signer:
        after_open = transient_handles(swtpm_module)
        signature = await signer.sign(MESSAGE, scheme)
        after_sign = transient_handles(swtpm_module)
        signature_again = await signer.sign(MESSAGE, scheme)
    assert after_open == []
    assert after_sign == []
    verify_signature(signer.public_key(), signature, MESSAGE, scheme)
    verify_signature(signer.public_key(), signature_again, MESSAGE, scheme)


async def test_signer_opened_in_worker_thread(
    swtpm_module: Swtpm, key_directory: Path
) -> None:
    uri = create_key(swtpm_module, "client")
    signer = await anyio.to_thread.run_sync(Registry.load().open_signer, uri)
    try:
        scheme = SignatureScheme.ecdsa_secp256r1_sha256
        signature = await signer.sign(MESSAGE, scheme)
    finally:
        await signer.aclose()
    verify_signature(signer.public_key(), signature, MESSAGE, scheme)


def test_full_object_slots_named_in_uri_syntax(
    swtpm_module: Swtpm, key_directory: Path
) -> None:
    uri = create_key(swtpm_module, "client")
    with object_slots_filled(swtpm_module), pytest.raises(SignerError) as raised:
        Registry.load().open_signer(uri)
    message = str(raised.value)
    assert message.startswith(f"{uri}: the TPM at {swtpm_module.tcti} has no free")
    assert "`tpm2_flushcontext -t`" in message
    assert "(device=/dev/tpmrm0 or tcti=tabrmd)" in message
    assert transient_handles(swtpm_module) == []


def test_full_object_slots_named_in_option_syntax(
    swtpm_module: Swtpm, key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with object_slots_filled(swtpm_module):
        status = main(["tpm", "create", "client", "--tcti", swtpm_module.tcti])
    error = capsys.readouterr().err
    assert status == 2
    assert "has no free slot for a loaded object" in error
    assert "`tpm2_flushcontext -t`" in error
    assert "(--device /dev/tpmrm0 or --tcti tabrmd)" in error
    assert transient_handles(swtpm_module) == []


async def test_sign_recovers_when_slots_free(
    swtpm_module: Swtpm, key_directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kmsproxy_tpm")
    uri = create_key(swtpm_module, "client")
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    async with open_signer(uri) as signer:
        with object_slots_filled(swtpm_module), pytest.raises(SignerError) as full:
            await signer.sign(MESSAGE, scheme)
        signature = await sign_when_ready(signer, scheme)
        left_loaded = transient_handles(swtpm_module)
    assert "has no free slot for a loaded object" in str(full.value)
    assert "(backoff tpm-reconnect)" in str(full.value)
    verify_signature(signer.public_key(), signature, MESSAGE, scheme)
    assert left_loaded == []
    # A busy TPM keeps its connection: one context for the whole test.
    assert caplog.text.count("Opened TPM tcti=") == 1


def test_commands_in_a_row_leave_no_objects(
    swtpm_module: Swtpm, key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statuses = []
    for index in range(ROUNDS_OF_COMMANDS):
        name = f"round{index}"
        uri = create_key(swtpm_module, name)
        statuses.append(main(["csr", uri, "--subject", f"CN={name}"]))
        statuses.append(main(["tpm", "list", "--tcti", swtpm_module.tcti]))
    output = capsys.readouterr().out
    assert statuses == [0] * (2 * ROUNDS_OF_COMMANDS)
    assert output.count("-----BEGIN CERTIFICATE REQUEST-----") == ROUNDS_OF_COMMANDS
    assert transient_handles(swtpm_module) == []


def test_hung_tpm_wait_is_bounded(
    swtpm_module: Swtpm, key_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = create_key(swtpm_module, "client")
    signer = Registry.load().open_signer(uri)
    assert isinstance(signer, BlockingSigner)
    monkeypatch.setattr(devices, "DEVICE_WAIT_SECONDS", HUNG_WAIT_SECONDS)
    entered = threading.Event()
    original = TPMDevice.call

    def marked(device: TPMDevice, function: Callable[[Any], Any]) -> Any:
        def inside(esapi: Any) -> Any:
            entered.set()
            return function(esapi)

        return original(device, inside)

    monkeypatch.setattr(TPMDevice, "call", marked)
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    first: list[bytes] = []
    hung = threading.Thread(
        target=lambda: first.append(signer.sign_blocking(MESSAGE, scheme)),
        daemon=True,
    )
    swtpm_module.pause()
    try:
        hung.start()
        assert entered.wait(HUNG_THREAD_SECONDS)
        with pytest.raises(SignerError) as waited:
            signer.sign_blocking(MESSAGE, scheme)
    finally:
        swtpm_module.resume()
        hung.join(HUNG_THREAD_SECONDS)
        anyio.run(signer.aclose)
    assert str(waited.value).startswith(f"{uri}: the TPM at {swtpm_module.tcti} ")
    assert f"did not finish the previous command within {HUNG_WAIT_SECONDS:g} s" in (
        str(waited.value)
    )
    assert "(backoff tpm-reconnect)" in str(waited.value)
    assert len(first) == 1
    verify_signature(signer.public_key(), first[0], MESSAGE, scheme)


class ManualClock:
    """A monotonic clock for `Backoff` that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_sign_backs_off_while_tpm_is_gone(
    swtpm_module: Swtpm, key_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    monkeypatch.setattr(devices, "Backoff", functools.partial(Backoff, clock=clock))
    uri = create_key(swtpm_module, "client")
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    async with open_signer(uri) as signer:
        swtpm_module.kill()
        try:
            with pytest.raises(SignerError) as lost:
                await signer.sign(MESSAGE, scheme)
            calls: list[object] = []
            original = TPMDevice.call

            def counted(device: TPMDevice, function: Callable[..., Any]) -> Any:
                calls.append(function)
                return original(device, function)

            monkeypatch.setattr(TPMDevice, "call", counted)
            with pytest.raises(SignerError) as held:
                await signer.sign(MESSAGE, scheme)
            calls_while_held = list(calls)
        finally:
            swtpm_module.restart()
        clock.now += devices.RECONNECT_POLICY.initial
        signature = await signer.sign(MESSAGE, scheme)
    assert str(lost.value).startswith("tpmkms:name=client;tcti=")
    assert "cannot talk to the TPM" in str(lost.value)
    assert "(backoff tpm-reconnect)" in str(held.value)
    assert calls_while_held == []
    verify_signature(signer.public_key(), signature, MESSAGE, scheme)


async def sign_when_ready(signer: Signer, scheme: SignatureScheme) -> bytes:
    """Sign once the backoff lets an attempt through, bounded in time."""
    with anyio.fail_after(BACKOFF_WAIT_SECONDS):
        while True:
            try:
                return await signer.sign(MESSAGE, scheme)
            except SignerError:
                await anyio.sleep(BACKOFF_POLL_SECONDS)


def test_key_file_is_private(swtpm_module: Swtpm, key_directory: Path) -> None:
    create_key(swtpm_module, "client")
    key_file = key_directory / "client.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_directory.stat().st_mode) == 0o700
    assert key_file.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")


def test_create_refuses_existing_name(
    swtpm_module: Swtpm, key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_key(swtpm_module, "client")
    before = (key_directory / "client.pem").read_bytes()
    status = main(["tpm", "create", "client", "--tcti", swtpm_module.tcti])
    assert status == 2
    assert "already exists" in capsys.readouterr().err
    assert (key_directory / "client.pem").read_bytes() == before


def test_create_rejects_path_as_name(
    key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["tpm", "create", "../escape", "--tcti", "swtpm:port=1"])
    assert status == 2
    assert "invalid key name '../escape'" in capsys.readouterr().err


async def test_list_shows_type_and_certificate(
    swtpm_module: Swtpm, key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_key(swtpm_module, "alpha")
    create_key(swtpm_module, "beta", "--curve", "P-384")
    ca = make_ca("list CA")
    async with open_signer(key_uri(swtpm_module, "alpha")) as signer:
        leaf = certify(ca, "alpha client", signer.public_key(), client=True)
    chain = write_chain(key_directory.parent / "alpha-chain.pem", [leaf, ca.cert])
    capsys.readouterr()
    assert main(["tpm", "import-cert", "alpha", str(chain)]) == 0
    assert main(["tpm", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("alpha\tEC P-256\tCN=alpha client until ")
    assert lines[-2].endswith("\ttpmkms:name=alpha")
    assert lines[-1] == "beta\tEC P-384\tno certificate\ttpmkms:name=beta"


async def test_import_cert_rejects_other_key(
    swtpm_module: Swtpm, key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_key(swtpm_module, "client")
    ca = make_ca("other CA")
    chain = write_chain(key_directory.parent / "other.pem", [ca.cert])
    assert main(["tpm", "import-cert", "client", str(chain)]) == 2
    assert "is not for the key client" in capsys.readouterr().err
    assert not (key_directory / "client.crt").exists()


def test_delete_removes_key_and_chain(
    swtpm_module: Swtpm, key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_key(swtpm_module, "client")
    (key_directory / "client.crt").write_text("chain\n")
    assert main(["tpm", "delete", "client"]) == 0
    assert not (key_directory / "client.pem").exists()
    assert not (key_directory / "client.crt").exists()
    assert main(["tpm", "delete", "client"]) == 2
    assert "no key named 'client'" in capsys.readouterr().err


async def test_auth_value_from_pin_source(
    swtpm_module: Swtpm, key_directory: Path, tmp_path: Path
) -> None:
    pin = tmp_path / "pin"
    pin.write_text("correct horse\n")
    create_key(swtpm_module, "client", "--pin-source", str(pin))
    async with open_signer(
        key_uri(swtpm_module, "client", f";pin-source={pin}")
    ) as signer:
        scheme = SignatureScheme.ecdsa_secp256r1_sha256
        signature = await signer.sign(MESSAGE, scheme)
        verify_signature(signer.public_key(), signature, MESSAGE, scheme)
    assert transient_handles(swtpm_module) == []


def test_wrong_auth_value_names_uri_not_secret(
    swtpm_module: Swtpm,
    key_directory: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    pin = tmp_path / "pin"
    pin.write_text("correct horse\n")
    create_key(swtpm_module, "client", "--pin-source", str(pin))
    uri = key_uri(swtpm_module, "client", "?pin-value=battery-staple")
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(uri)
    message = str(raised.value)
    assert message.startswith("tpmkms:name=client;tcti=")
    assert "pin-value=***" in message
    assert "the TPM rejected the key's auth value" in message
    assert "battery-staple" not in message
    assert "battery-staple" not in repr(raised.value)
    assert "battery-staple" not in caplog.text
    assert transient_handles(swtpm_module) == []


def test_missing_auth_value_is_named(
    swtpm_module: Swtpm, key_directory: Path, tmp_path: Path
) -> None:
    pin = tmp_path / "pin"
    pin.write_text("correct horse\n")
    create_key(swtpm_module, "client", "--pin-source", str(pin))
    with pytest.raises(SignerError, match="the key has an auth value and the TPM"):
        Registry.load().open_signer(key_uri(swtpm_module, "client"))


def test_missing_key_names_uri_and_fix(
    swtpm_module: Swtpm, key_directory: Path
) -> None:
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(key_uri(swtpm_module, "absent"))
    message = str(raised.value)
    assert message.startswith("tpmkms:name=absent;")
    assert "absent.pem not found" in message
    assert "`kmsproxy tpm list`" in message


def test_missing_device_names_path(swtpm_module: Swtpm, key_directory: Path) -> None:
    create_key(swtpm_module, "client")
    uri = "tpmkms:name=client;device=/nonexistent/tpmrm0"
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(uri)
    message = str(raised.value)
    assert message.startswith(uri + ": no TPM found at /nonexistent/tpmrm0")
    assert "another TPM with tcti=TCTI (for example tcti=swtpm:" in message


def test_missing_device_named_in_option_syntax(
    key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["tpm", "create", "client", "--device", "/nonexistent/tpmrm0"])
    error = capsys.readouterr().err
    assert status == 2
    assert "no TPM found at /nonexistent/tpmrm0" in error
    assert "another TPM with --tcti TCTI (for example --tcti swtpm:" in error
    assert "tcti=" not in error


def test_device_that_is_no_tpm_is_named(
    key_directory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    status = main(["tpm", "create", "client", "--device", str(fifo)])
    assert status == 2
    assert f"{fifo} is not a TPM character device" in capsys.readouterr().err


def test_rsa_key_is_sign_only(swtpm_module: Swtpm, key_directory: Path) -> None:
    create_key(swtpm_module, "client", "--kty", "RSA")
    blob = read_key_file(key_directory / "client.pem")
    attributes = int(blob.public_area.objectAttributes)
    assert attributes & int(TPMA_OBJECT.SIGN_ENCRYPT)
    assert not attributes & int(TPMA_OBJECT.DECRYPT)


def test_unknown_tcti_is_named(swtpm_module: Swtpm, key_directory: Path) -> None:
    create_key(swtpm_module, "client")
    with pytest.raises(SignerError, match="cannot load the TCTI 'nosuchtcti'"):
        Registry.load().open_signer("tpmkms:name=client;tcti=nosuchtcti")


def test_stopped_emulator_is_named(swtpm_module: Swtpm, key_directory: Path) -> None:
    create_key(swtpm_module, "client")
    closed = "swtpm:host=127.0.0.1,port=1"
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(f"tpmkms:name=client;tcti={closed}")
    assert f"cannot talk to the TPM at {closed}" in str(raised.value)


def test_busy_tpm_is_named(
    swtpm_module: Swtpm, key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_key(swtpm_module, "client")
    with busy_tpm() as tpm:
        status = main(["tpm", "create", "other", "--tcti", tpm.tcti])
        with pytest.raises(SignerError) as raised:
            Registry.load().open_signer(f"tpmkms:name=client;tcti={tpm.tcti}")
    assert status == 2
    assert f"the TPM at {tpm.tcti} is busy" in capsys.readouterr().err
    assert f"the TPM at {tpm.tcti} is busy" in str(raised.value)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("tpmkms:name=client;slot-id=9a", "unknown attribute slot-id"),
        ("tpmkms:device=/dev/tpmrm0", "missing name= or path="),
        ("tpmkms:name=a;path=/tmp/a.pem", "give name= (a key in "),
        ("tpmkms:name=a;device=/dev/tpm0;tcti=tabrmd", "give device= or tcti="),
        ("tpmkms:name=a;pin-value=1;pin-source=/p", "give pin-value= or pin-source="),
        ("tpmkms:name=../a", "invalid key name '../a'"),
    ],
    ids=["unknown", "no-key", "name-and-path", "two-tpms", "two-pins", "bad-name"],
)
def test_invalid_uri_is_named(key_directory: Path, uri: str, message: str) -> None:
    with pytest.raises(SignerError, match=re.escape(message)) as raised:
        Registry.load().open_signer(uri)
    assert str(raised.value).startswith("tpmkms:")
    assert "pin-value=1" not in str(raised.value)


@pytest.mark.parametrize(
    "uri",
    [
        "tpmkms:name=client;auth-value=SECRETD",
        "tpmkms:name=client;pnivalue=SECRETD",
        # The auth value "ab&SECRETD=1" is split at its unencoded `&`.
        "tpmkms:name=client?pin-value=ab&SECRETD=1",
    ],
    ids=["auth-value", "misspelt", "split"],
)
def test_unknown_secret_not_shown(key_directory: Path, uri: str) -> None:
    with pytest.raises(SignerError, match="unknown attribute") as raised:
        Registry.load().open_signer(uri)
    assert "secretd" not in str(raised.value).lower()


def test_empty_list_says_how_to_create(
    key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tpm", "list"]) == 0
    output = capsys.readouterr()
    assert output.out == ""
    assert "create one with `kmsproxy tpm create NAME`" in output.err


def test_plain_pem_path_is_not_tss2(key_directory: Path, tmp_path: Path) -> None:
    ca = make_ca("not a TPM key")
    key_path, _ = ca.write(tmp_path, "software")
    with pytest.raises(SignerError, match="is not a TSS2 PRIVATE KEY PEM file"):
        Registry.load().open_signer(f"tpmkms:path={key_path}")


def test_cli_error_has_no_traceback(
    key_directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["tpm", "create", "client", "--tcti", "nosuchtcti"])
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("kmsproxy: error: tpm create client: cannot load the TCTI")
    assert "Traceback" not in error
