"""Time `Signer.sign` for each key source against a software key.

Each key source contains a P-256 and an RSA-2048 key: a PEM file (the
baseline), swtpm, a SoftHSM2 token and moto's KMS server. The stores are
started by the backends' own test helpers, listen on 127.0.0.1 only, and
are stopped by PID when the section ends. The moto rows run with dummy
credentials, AWS_EC2_METADATA_DISABLED=true and `endpoint=` set to moto.

A round times `signatures` calls of `Signer.sign` one after another and
keeps their median, so each row holds one median per round. The timed path
is the whole call a handshake makes: the hop to the worker thread, the
backend's request to its store and the check of the signature.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from servers import ROOT

for _package in ("kmsproxy-tpm", "kmsproxy-pkcs11", "kmsproxy-awskms"):
    sys.path.insert(0, str(ROOT / "packages" / _package / "tests"))

import pki  # noqa: E402  (the core tests' helper, found through sys.path)

from kmsproxy.plugins.registry import Registry  # noqa: E402
from kmsproxy.signer import SignatureScheme  # noqa: E402

# Signatures per round and rounds per key. Five rounds give a min and a
# max besides the median, and the whole section took 11 s on 2 cores of an
# AMD EPYC (the run on docs/benchmarks.md).
SIGNATURES = 50
ROUNDS = 5

# Signatures made and discarded before the first round, so that opening a
# session or a connection to the store does not count.
WARMUP_SIGNATURES = 3

# The data a TLS 1.3 CertificateVerify signs is 130 bytes for SHA-256
# (RFC 8446, section 4.4.3): 64 spaces, a 33-byte context string, a zero
# byte and the 32-byte transcript hash.
MESSAGE_BYTES = 130


@dataclass(frozen=True)
class KeyType:
    """A key type that every source contains, and the scheme it signs with."""

    name: pki.KeyType
    label: str
    scheme: SignatureScheme
    tpm_options: tuple[str, ...]
    kms_key_spec: str


KEY_TYPES = (
    KeyType(
        "p256",
        "P-256",
        SignatureScheme.ecdsa_secp256r1_sha256,
        (),
        "ECC_NIST_P256",
    ),
    KeyType(
        "rsa2048",
        "RSA-2048",
        SignatureScheme.rsa_pss_rsae_sha256,
        ("--kty", "RSA"),
        "RSA_2048",
    ),
)


@dataclass
class SignerRow:
    """The per-round medians of one key, in milliseconds per signature."""

    source: str
    label: str
    key_type: str
    scheme: str
    status: str = "measured"
    note: str = ""
    values: list[float] = field(default_factory=list)


@dataclass
class KeyStore:
    """A running key source: one URI per key type, and how to stop it."""

    uris: dict[str, str]
    stop: Callable[[], None] | None = None


def software_store(directory: Path) -> KeyStore:
    """Write one PEM key file per key type."""
    uris: dict[str, str] = {}
    for key_type in KEY_TYPES:
        path = directory / f"software-{key_type.name}.key"
        key = pki.generate_key(key_type.name)
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        uris[key_type.name] = str(path)
    return KeyStore(uris)


def swtpm_store(directory: Path) -> KeyStore:
    """Start swtpm and create each key with `kmsproxy tpm create`."""
    from swtpm_emulator import start_swtpm

    from kmsproxy.cli import main

    # `kmsproxy tpm create` and `tpmkms:name=` keep key blobs here.
    os.environ["XDG_CONFIG_HOME"] = str(directory / "xdg")
    emulator = start_swtpm(directory / "tpm")
    try:
        uris: dict[str, str] = {}
        for key_type in KEY_TYPES:
            name = f"bench-{key_type.name}"
            argv = ["tpm", "create", name, "--tcti", emulator.tcti]
            with contextlib.redirect_stdout(io.StringIO()):
                status = main([*argv, *key_type.tpm_options])
            if status != 0:
                raise RuntimeError(f"kmsproxy tpm create {name} exited with {status}")
            uris[key_type.name] = f"tpmkms:name={name};tcti={emulator.tcti}"
    except BaseException:
        emulator.stop()
        raise
    return KeyStore(uris, emulator.stop)


def softhsm2_store(directory: Path) -> KeyStore:
    """Generate each key on a new SoftHSM2 token."""
    from softhsm_token import create_softhsm, key_uri

    hsm = create_softhsm(directory / "softhsm")
    os.environ["SOFTHSM2_CONF"] = str(hsm.config)
    hsm.init_token("bench")
    uris: dict[str, str] = {}
    for index, key_type in enumerate(KEY_TYPES, start=1):
        object_id = bytes([index])
        hsm.generate_key("bench", key_type.name, object_id, key_type.name)  # type: ignore[arg-type]
        uris[key_type.name] = key_uri(hsm, "bench", object_id)
    return KeyStore(uris)


def moto_store(directory: Path) -> KeyStore:
    """Start moto_server on 127.0.0.1 and create each key in its KMS."""
    import awskms_moto

    close_aws_environment(directory / "aws")
    server = awskms_moto.start_moto(directory)
    try:
        uris: dict[str, str] = {
            key_type.name: server.uri(server.create_key(key_type.kms_key_spec))
            for key_type in KEY_TYPES
        }
    except BaseException:
        server.stop()
        raise
    return KeyStore(uris, server.stop)


def close_aws_environment(directory: Path) -> None:
    """Point botocore at dummy credentials and empty files, and at no metadata
    address, as the awskms tests' `aws_environment` fixture does."""
    import awskms_moto

    directory.mkdir()
    for name in ("config", "credentials", "boto.cfg"):
        (directory / name).write_text("")
    for name in awskms_moto._CREDENTIAL_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": awskms_moto.DUMMY_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": awskms_moto.DUMMY_SECRET_ACCESS_KEY,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(directory / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(directory / "credentials"),
            "BOTO_CONFIG": str(directory / "boto.cfg"),
            "AWS_REGION": awskms_moto.REGION,
            "AWS_DEFAULT_REGION": awskms_moto.REGION,
        }
    )


@dataclass(frozen=True)
class Source:
    """A place the key lives, as one group of rows in the table."""

    name: str
    label: str
    start: Callable[[Path], KeyStore]


SOURCES = (
    Source("software", "software key (PEM file)", software_store),
    Source("swtpm", "swtpm", swtpm_store),
    Source("softhsm2", "SoftHSM2", softhsm2_store),
    Source("moto", "AWS KMS API on moto_server", moto_store),
)


async def round_medians(
    uri: str, preferred: SignatureScheme, signatures: int, rounds: int
) -> tuple[SignatureScheme, list[float]]:
    """Open `uri`, sign `rounds` times `signatures` messages, and return the
    scheme used and the median of each round in milliseconds."""
    signer = Registry.load().open_signer(uri)
    try:
        # NOTE: moto 5.2 returns RSA-PSS signatures that do not verify, so the
        # awskms signer drops the PSS schemes and the moto RSA row signs with
        # the key's first offered scheme (PKCS#1 v1.5) while the others use PSS.
        scheme = preferred if preferred in signer.schemes else signer.schemes[0]
        message = os.urandom(MESSAGE_BYTES)
        for _ in range(WARMUP_SIGNATURES):
            await signer.sign(message, scheme)
        medians = []
        for _ in range(rounds):
            samples = []
            for _ in range(signatures):
                start = time.perf_counter()
                await signer.sign(message, scheme)
                samples.append((time.perf_counter() - start) * 1000)
            medians.append(statistics.median(samples))
        return scheme, medians
    finally:
        # swtpm serves one connection at a time, so close before the next key.
        await signer.aclose()


def measure(
    directory: Path,
    signatures: int = SIGNATURES,
    rounds: int = ROUNDS,
    log: Callable[[str], None] = print,
) -> list[SignerRow]:
    """Measure every source and key type; a source that fails costs its rows."""
    rows: list[SignerRow] = []
    environment = dict(os.environ)
    try:
        for source in SOURCES:
            rows += _measure_source(source, directory, signatures, rounds, log)
    finally:
        os.environ.clear()
        os.environ.update(environment)
    return rows


def _measure_source(
    source: Source,
    directory: Path,
    signatures: int,
    rounds: int,
    log: Callable[[str], None],
) -> list[SignerRow]:
    rows = [
        SignerRow(source.name, source.label, key_type.label, key_type.scheme.name)
        for key_type in KEY_TYPES
    ]
    source_directory = directory / f"signers-{source.name}"
    source_directory.mkdir()
    try:
        store = source.start(source_directory)
    except (Exception, pytest.fail.Exception) as error:
        # The test helpers report a missing program with pytest.fail, whose
        # exception derives from BaseException.
        for row in rows:
            row.status = "failed"
            row.note = f"starting the store failed: {type(error).__name__}: {error}"
        log(f"signers, {source.name}: {rows[0].note}")
        return rows
    try:
        for row, key_type in zip(rows, KEY_TYPES, strict=True):
            log(f"signers, {source.name}: {rounds} rounds of {row.key_type}")
            try:
                scheme, row.values = anyio.run(
                    round_medians,
                    store.uris[key_type.name],
                    key_type.scheme,
                    signatures,
                    rounds,
                )
                row.scheme = scheme.name
            except Exception as error:
                row.status = "failed"
                row.note = f"{type(error).__name__}: {error}".splitlines()[0]
                log(f"signers, {source.name}, {row.key_type}: failed: {row.note}")
    finally:
        if store.stop is not None:
            store.stop()
    return rows


def versions() -> dict[str, str]:
    """Return the versions of the key stores measured."""

    def first_line(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, check=False
            )
            text = (result.stdout or result.stderr).strip()
            return text.splitlines()[0] if text else "unknown"
        return "unknown"

    moto = "unknown"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        moto = importlib.metadata.version("moto")
    return {
        # swtpm prints "TPM emulator version 0.7.1, Copyright ...".
        "swtpm": first_line(["swtpm", "--version"]).split("version ")[-1].split(",")[0],
        "softhsm2": first_line(["softhsm2-util", "--version"]),
        "moto": moto,
    }
