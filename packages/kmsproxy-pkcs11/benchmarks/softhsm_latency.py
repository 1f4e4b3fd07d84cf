"""Measure signature latency on a SoftHSM2 token against a software key.

Run from the repository root:

    .venv/bin/python packages/kmsproxy-pkcs11/benchmarks/softhsm_latency.py

For a P-256 key and an RSA-2048 key it prints the median time of
`SIGNATURES` signatures through each signer's `sign`, which includes the
hop to the worker thread and the check of each signature. One key is on a
new SoftHSM2 token, the other of the same type in a PEM file. The token
lives in a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from cryptography.hazmat.primitives import serialization

REPOSITORY = Path(__file__).resolve().parents[3]
sys.path[:0] = [
    str(REPOSITORY / "packages" / "kmsproxy-core" / "tests"),
    str(REPOSITORY / "packages" / "kmsproxy-pkcs11" / "tests"),
]

from pki import generate_key  # noqa: E402
from softhsm_token import TokenKeyType, create_softhsm, key_uri  # noqa: E402

from kmsproxy.plugins.registry import Registry  # noqa: E402
from kmsproxy.signer import SignatureScheme, Signer  # noqa: E402

# Signatures per signer; the median of 20 is stable to about 0.01 ms here.
SIGNATURES = 20

CASES: list[tuple[TokenKeyType, SignatureScheme]] = [
    ("p256", SignatureScheme.ecdsa_secp256r1_sha256),
    ("rsa2048", SignatureScheme.rsa_pss_rsae_sha256),
]


async def median_milliseconds(signer: Signer, scheme: SignatureScheme) -> float:
    """Return the median time of `SIGNATURES` signatures, in milliseconds."""
    times = []
    for index in range(SIGNATURES):
        start = time.perf_counter()
        await signer.sign(f"CertificateVerify {index}".encode(), scheme)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def measure(directory: Path) -> None:
    """Print one line per case: both medians and their ratio."""
    hsm = create_softhsm(directory / "softhsm")
    os.environ["SOFTHSM2_CONF"] = str(hsm.config)
    hsm.init_token("latency")
    registry = Registry.load()
    for index, (key_type, scheme) in enumerate(CASES, start=1):
        object_id = bytes([index])
        hsm.generate_key("latency", key_type, object_id, key_type)
        key_file = directory / f"{key_type}.key"
        key_file.write_bytes(
            generate_key(key_type).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        token_signer = registry.open_signer(key_uri(hsm, "latency", object_id))
        file_signer = registry.open_signer(str(key_file))
        try:
            on_token = await median_milliseconds(token_signer, scheme)
            in_file = await median_milliseconds(file_signer, scheme)
        finally:
            await token_signer.aclose()
            await file_signer.aclose()
        print(
            f"{scheme.name}: token {on_token:.3f} ms, file {in_file:.3f} ms, "
            f"ratio {on_token / in_file:.1f}"
        )


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        anyio.run(measure, Path(directory))


if __name__ == "__main__":
    main()
