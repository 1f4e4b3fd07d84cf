"""A swtpm TPM 2.0 emulator on loopback for the TPM backend's tests.

`start_swtpm` runs `swtpm socket --tpm2` on two free 127.0.0.1 ports (the
TPM commands and the control channel) with its state in a directory under
the test's temporary path, and waits (bounded) until it accepts connections. `stop` and
`restart` end it by PID; a restart keeps the state directory, so keys made
before still load, as after a reboot. `swtpm_module` is the module-scoped
fixture that test modules import.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from peers import LOOPBACK, READY_POLL_SECONDS, free_port

# swtpm starts in well under a second; 10 s leaves room for a loaded runner.
READY_TIMEOUT_SECONDS = 10.0

# Time swtpm gets to exit after SIGTERM before it receives SIGKILL.
STOP_TIMEOUT_SECONDS = 5.0

# Tries at finding two adjacent free ports; most first picks succeed.
MAX_PORT_PAIR_TRIES = 50


class SwtpmError(Exception):
    """swtpm is missing or did not start; the message includes its log."""


@dataclass
class Swtpm:
    """One swtpm process and its state directory.

    The control channel listens on `port + 1`, where the TCTI expects it.
    """

    state_directory: Path
    log_path: Path
    port: int = 0
    control_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def tcti(self) -> str:
        """The tpm2-tss TCTI string that reaches this emulator."""
        return f"swtpm:host={LOOPBACK},port={self.port}"

    def start(self) -> None:
        """Start swtpm on its ports (new free ones the first time) and wait."""
        binary = shutil.which("swtpm")
        if binary is None:
            raise SwtpmError(
                "swtpm not found on PATH (install the Debian package swtpm)"
            )
        if not self.port:
            self.port = free_port_pair()
            self.control_port = self.port + 1
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [
                    binary,
                    "socket",
                    "--tpm2",
                    "--server",
                    f"type=tcp,port={self.port},bindaddr={LOOPBACK}",
                    "--ctrl",
                    f"type=tcp,port={self.control_port},bindaddr={LOOPBACK}",
                    "--tpmstate",
                    f"dir={self.state_directory}",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        # A connection to the control port proves swtpm listens without
        # taking the one TPM command connection it serves at a time.
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SwtpmError(
                    f"swtpm exited with status {self.process.returncode}; its log:\n"
                    f"{self.log_path.read_text(errors='replace')}"
                )
            with contextlib.suppress(OSError):
                socket.create_connection(
                    (LOOPBACK, self.control_port), timeout=1
                ).close()
                return
            time.sleep(READY_POLL_SECONDS)
        self.stop()
        raise SwtpmError(
            f"swtpm did not listen on {LOOPBACK}:{self.control_port} within "
            f"{READY_TIMEOUT_SECONDS} s"
        )

    def stop(self) -> None:
        """Stop swtpm by PID: SIGTERM, then SIGKILL after a timeout."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def kill(self) -> None:
        """End swtpm at once with SIGKILL, as a crash would."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def pause(self) -> None:
        """Stop swtpm with SIGSTOP: connections stay open, nothing responds."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused swtpm with SIGCONT."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Start swtpm again on the same ports with the same state."""
        self.start()


def free_port_pair() -> int:
    """Return a free loopback port P whose neighbour P+1 is free too.

    tpm2-tss's swtpm TCTI always reaches the control channel at port + 1.
    """
    for _ in range(MAX_PORT_PAIR_TRIES):
        port = free_port()
        if port + 1 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((LOOPBACK, port + 1))
            except OSError:
                continue
        return port
    raise SwtpmError(f"no two adjacent free ports in {MAX_PORT_PAIR_TRIES} tries")


def start_swtpm(directory: Path) -> Swtpm:
    state = directory / "swtpm-state"
    state.mkdir(parents=True)
    emulator = Swtpm(state_directory=state, log_path=directory / "swtpm.log")
    emulator.start()
    return emulator


@pytest.fixture(scope="module")
def swtpm_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """One swtpm for the whole test module."""
    emulator = start_swtpm(tmp_path_factory.mktemp("swtpm"))
    try:
        yield emulator
    finally:
        emulator.stop()
