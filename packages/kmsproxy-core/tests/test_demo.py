"""`kmsproxy demo` runs a full round trip with nothing but Python."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from kmsproxy.cli.demo import run_demo

# Upper bound for the whole demo process, which finishes in about a second.
DEMO_PROCESS_TIMEOUT_SECONDS = 60.0


def test_demo_command_prints_subject() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kmsproxy", "demo"],
        capture_output=True,
        text=True,
        timeout=DEMO_PROCESS_TIMEOUT_SECONDS,
        # An empty PATH proves the demo needs no curl, nginx or openssl.
        env={**os.environ, "PATH": ""},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "subject=CN=kmsproxy demo client" in result.stdout
    assert "Traceback" not in result.stderr


def test_demo_removes_its_directory() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kmsproxy", "demo"],
        capture_output=True,
        text=True,
        timeout=DEMO_PROCESS_TIMEOUT_SECONDS,
        check=False,
    )
    first_line = result.stdout.splitlines()[0]
    directory = Path(first_line.rsplit(" ", 1)[1])
    assert first_line.startswith("Created a throwaway CA")
    assert not directory.exists()


def test_demo_over_ipv6(tmp_path: Path) -> None:
    if not has_ipv6_loopback():
        pytest.skip("this machine has no ::1 loopback address")
    out = io.StringIO()
    body = anyio.run(run_demo, tmp_path, out, "::1")
    assert "subject=CN=kmsproxy demo client" in body
    assert "http://[::1]:" in out.getvalue()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
