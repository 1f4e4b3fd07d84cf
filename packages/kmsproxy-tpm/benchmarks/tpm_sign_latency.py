"""Measure TLS signature latency with keys in swtpm against software keys.

Starts swtpm on free 127.0.0.1 ports with its state in a temporary
directory, creates an EC P-256 and an RSA 2048 key with `kmsproxy tpm
create`, and times `Signer.sign` (the whole path: worker thread, limiter,
TPM2_Sign over the swtpm TCTI) for each. The same scheme is timed on a
`cryptography` key of the same type in the same run. swtpm is stopped by
its PID at the end.

    .venv/bin/python packages/kmsproxy-tpm/benchmarks/tpm_sign_latency.py

Prints one line per key type: median milliseconds for the TPM key and the
software key, and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [
    str(ROOT / "packages" / "kmsproxy-tpm" / "tests"),
    str(ROOT / "packages" / "kmsproxy-core" / "tests"),
]

from pki import KeyType, generate_key  # noqa: E402 - needs the tests path above
from swtpm_emulator import start_swtpm  # noqa: E402

from kmsproxy.cli import main  # noqa: E402
from kmsproxy.plugins.registry import Registry  # noqa: E402
from kmsproxy.signer import SignatureScheme, SoftwareSigner  # noqa: E402

# Signatures timed per key; the median of 20 is stable to about 5 % on swtpm.
DEFAULT_ROUNDS = 20

# Signatures made and thrown away first, so loading the key and warming
# caches do not count.
WARMUP_ROUNDS = 3

MESSAGE = os.urandom(130)

CASES: tuple[tuple[str, tuple[str, ...], KeyType, SignatureScheme], ...] = (
    ("EC P-256", (), "p256", SignatureScheme.ecdsa_secp256r1_sha256),
    ("RSA 2048", ("--kty", "RSA"), "rsa2048", SignatureScheme.rsa_pss_rsae_sha256),
)


async def median_milliseconds(
    sign: Callable[[bytes, SignatureScheme], Awaitable[bytes]],
    scheme: SignatureScheme,
    rounds: int,
) -> float:
    for _ in range(WARMUP_ROUNDS):
        await sign(MESSAGE, scheme)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await sign(MESSAGE, scheme)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def measure(tcti: str, rounds: int) -> None:
    registry = Registry.load()
    print(f"signature latency, median of {rounds} (ms)")
    print("key\tTPM (swtpm)\tsoftware\tratio")
    for label, options, software_type, scheme in CASES:
        name = label.replace(" ", "-").lower()
        with contextlib.redirect_stdout(io.StringIO()):
            status = main(["tpm", "create", name, "--tcti", tcti, *options])
        if status != 0:
            raise SystemExit(f"kmsproxy tpm create {name} failed")
        signer = registry.open_signer(f"tpmkms:name={name};tcti={tcti}")
        try:
            tpm = await median_milliseconds(signer.sign, scheme, rounds)
        finally:
            await signer.aclose()
        software_key = generate_key(software_type)
        software_signer = SoftwareSigner(software_key, "software")
        software = await median_milliseconds(software_signer.sign, scheme, rounds)
        print(f"{label}\t{tpm:.2f}\t{software:.3f}\t{tpm / software:.0f}x")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        os.environ["XDG_CONFIG_HOME"] = str(Path(directory) / "config")
        swtpm = start_swtpm(Path(directory))
        try:
            anyio.run(measure, swtpm.tcti, args.rounds)
        finally:
            swtpm.stop()


if __name__ == "__main__":
    run()
