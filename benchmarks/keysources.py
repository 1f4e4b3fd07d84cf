"""Where kmsproxy's client key lives in each kmsproxy row of the results.

Each setup function makes the client key in its store, certifies its public
key with the run's client CA, and returns the `--clientkey` and
`--clientcert` arguments for `kmsproxy serve`. The key stores are the ones
the backends' own tests use: a file, swtpm and a SoftHSM2 token, all under
the run's directory, with swtpm listening on 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from cryptography.hazmat.primitives import serialization
from servers import ROOT, Keys

for _package in ("kmsproxy-tpm", "kmsproxy-pkcs11"):
    sys.path.insert(0, str(ROOT / "packages" / _package / "tests"))

import pki  # noqa: E402

from kmsproxy.plugins.registry import Registry  # noqa: E402
from kmsproxy.signer import PublicKey  # noqa: E402


@dataclass
class KeySetup:
    """The arguments for one key source, and how to stop what it started."""

    key_argument: str
    cert_argument: str
    stop: Callable[[], None] | None = None


def file_key(keys: Keys, directory: Path) -> KeySetup:
    return KeySetup(str(keys.client_key), str(keys.client_cert))


def swtpm_key(keys: Keys, directory: Path) -> KeySetup:
    """Create the key in a new swtpm with `kmsproxy tpm create`."""
    from swtpm_emulator import start_swtpm

    from kmsproxy.cli import main

    # `kmsproxy tpm create` and `tpmkms:name=` keep key blobs under
    # XDG_CONFIG_HOME, which the proxy started later inherits.
    os.environ["XDG_CONFIG_HOME"] = str(directory / "xdg")
    emulator = start_swtpm(directory / "tpm")
    try:
        if main(["tpm", "create", "bench", "--tcti", emulator.tcti]) != 0:
            raise RuntimeError("kmsproxy tpm create failed (see its message above)")
        uri = f"tpmkms:name=bench;tcti={emulator.tcti}"
        certificate = certify(keys, public_key_of(uri), directory / "tpm-client.crt")
    except BaseException:
        emulator.stop()
        raise
    return KeySetup(uri, str(certificate), emulator.stop)


def softhsm2_key(keys: Keys, directory: Path) -> KeySetup:
    """Generate a P-256 key on a new SoftHSM2 token."""
    from softhsm_token import create_softhsm, key_uri

    hsm = create_softhsm(directory / "softhsm")
    # The proxy started later inherits the configuration.
    os.environ["SOFTHSM2_CONF"] = str(hsm.config)
    hsm.init_token("bench")
    object_id = b"\x01"
    public_key = hsm.generate_key("bench", "p256", object_id, "client")
    certificate = certify(keys, public_key, directory / "softhsm-client.crt")
    return KeySetup(key_uri(hsm, "bench", object_id), str(certificate))


def public_key_of(uri: str) -> PublicKey:
    """Open `uri` through the installed backends and return its public key."""
    signer = Registry.load().open_signer(uri)
    try:
        return signer.public_key()
    finally:
        # swtpm serves one connection at a time, so close before the proxy
        # opens the key.
        anyio.run(signer.aclose)


def certify(keys: Keys, public_key: PublicKey, path: Path) -> Path:
    """Issue a client certificate for `public_key` from the run's client CA."""
    certificate = pki.certify(
        keys.client_issuer, "bench client", public_key, client=True
    )
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path
