"""The `kmsproxy` command line, run as users run it."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from pki import issue, make_ca

from kmsproxy.cli import build_parser, main, parse_command_line
from kmsproxy.cli.serve import MAX_HELD_RECORDS, StartupLogBuffer, config_from_args
from kmsproxy.plugins import file as file_backend
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import Registry

# Upper bound for the proxy process to start or stop; it takes well under a
# second on an idle machine.
PROCESS_TIMEOUT_SECONDS = 15.0


def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsproxy", *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        env={**os.environ, **(env or {})},
        check=False,
    )


def parse_serve(*args: str) -> argparse.Namespace:
    return parse_command_line(build_parser(None), ["serve", *args])


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"kmsproxy \d+\.\d+\.\d+\S*\n", result.stdout)


def test_unknown_scheme_is_one_line(tmp_path: Path) -> None:
    key, cert = make_ca().write(tmp_path, "ca")
    result = run_cli(
        "serve", str(key), str(cert), "--clientkey", "vault:name=k",
        "--clientcert", str(cert),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "no installed backend handles the scheme 'vault'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def core_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every registry see only the file backend.

    The dev environment installs this repository's four backends, so the
    messages for a missing backend are tested with their entry points unseen.
    """
    load = Registry.load.__func__  # type: ignore[attr-defined]

    def load_core_only(
        cls: type[Registry], /, plugins: Iterable[object] = (), **_: object
    ) -> Registry:
        return load(cls, [file_backend, *plugins], entry_points=False)  # type: ignore[no-any-return]

    monkeypatch.setattr(Registry, "load", classmethod(load_core_only))


def test_init_creates_private_key(tmp_path: Path) -> None:
    result = run_cli("init", env={"XDG_CONFIG_HOME": str(tmp_path)})
    key = tmp_path / "kmsproxy" / "ca.key"
    assert result.returncode == 0, result.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "kmsproxy" / "ca.crt").exists()


def test_init_prints_trust_steps(tmp_path: Path) -> None:
    result = run_cli("init", "--dir", str(tmp_path))
    assert "update-ca-certificates" in result.stdout
    assert "trust anchor" in result.stdout
    assert "security add-trusted-cert" in result.stdout
    assert "certutil -addstore" in result.stdout


def test_init_refuses_overwrite(tmp_path: Path) -> None:
    run_cli("init", "--dir", str(tmp_path))
    before = (tmp_path / "ca.key").read_bytes()
    result = run_cli("init", "--dir", str(tmp_path))
    assert result.returncode == 2
    assert "--force" in result.stderr
    assert (tmp_path / "ca.key").read_bytes() == before


def test_init_force_replaces(tmp_path: Path) -> None:
    run_cli("init", "--dir", str(tmp_path))
    before = (tmp_path / "ca.key").read_bytes()
    result = run_cli("init", "--dir", str(tmp_path), "--force")
    assert result.returncode == 0
    assert (tmp_path / "ca.key").read_bytes() != before


def test_serve_without_ca_suggests_init(tmp_path: Path) -> None:
    result = run_cli(
        "serve",
        "--clientkey",
        "k",
        "--clientcert",
        "c",
        env={"XDG_CONFIG_HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "kmsproxy init" in result.stderr


def test_backends_lists_file() -> None:
    result = run_cli("backends")
    assert result.returncode == 0
    assert re.search(r"^file:\tinstalled\tkmsproxy-core$", result.stdout, re.M)


def test_backends_missing_hint(
    core_only: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("file:\tinstalled\t")
    tpm = [line for line in lines if line.startswith("tpmkms:")]
    assert tpm == [
        "tpmkms:\tnot installed\tkmsproxy-tpm provides it; it is on no package "
        "index, so install it from a checkout of the kmsproxy repository with "
        "`pipx inject kmsproxy-core ./packages/kmsproxy-tpm` (pipx) or "
        "`pip install ./packages/kmsproxy-tpm` (in the environment that runs "
        "kmsproxy)"
    ]


def test_go_flag_spellings() -> None:
    args = parse_serve(
        "a.key", "a.crt", "--clientkey", "k", "--clientcert", "c",
        "--cacert", "x.pem", "--trust", "y.pem", "--pac-port", "9999",
        "--listen", "tcp:127.0.0.1:8090",
    )  # fmt: skip
    config = config_from_args(args)
    assert list(config.trust) == [Path("x.pem"), Path("y.pem")]
    assert config.pac_listen == "localhost:9999"
    assert config.listen == "tcp:127.0.0.1:8090"


def test_repeated_identities() -> None:
    args = parse_serve(
        "a.key", "a.crt",
        "--clientkey", "k1", "--clientcert", "c1",
        "--clientkey", "k2", "--clientcert", "c2",
    )  # fmt: skip
    config = config_from_args(args)
    assert list(config.client_keys) == ["k1", "k2"]
    assert list(config.client_certificates) == ["c1", "c2"]


def test_backend_adds_command(capsys: pytest.CaptureFixture[str]) -> None:
    module = types.ModuleType("kmsproxy_fake")

    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return 0

    @hookimpl
    def kmsproxy_schemes() -> list[str]:
        return ["fakekms"]

    @hookimpl
    def kmsproxy_add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        parser = subparsers.add_parser("fake", help="a backend command")
        parser.add_argument("name")
        parser.set_defaults(handler=hello)

    module.kmsproxy_schemes = kmsproxy_schemes  # type: ignore[attr-defined]
    module.kmsproxy_add_commands = kmsproxy_add_commands  # type: ignore[attr-defined]
    args = build_parser(Registry.load([module])).parse_args(["fake", "world"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == "hello world\n"


def test_main_returns_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["serve", "a", "b", "--clientkey", "vault:x=1", "--clientcert", "c"])
    assert status == 2
    assert capsys.readouterr().err.startswith("kmsproxy: error: ")


def wait_for_line(process: subprocess.Popen[str], pattern: str) -> re.Match[str]:
    """Read the process's stderr until a line matches (bounded)."""
    assert process.stderr is not None
    deadline = time.monotonic() + PROCESS_TIMEOUT_SECONDS
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matched {pattern!r}; output:\n{''.join(seen)}")


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_on_signal(tmp_path: Path, signal_number: int) -> None:
    ca = make_ca()
    ca.write(tmp_path, "ca")
    issue(ca, "client", client=True).write(tmp_path, "client")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "kmsproxy", "serve",
            str(tmp_path / "ca.key"), str(tmp_path / "ca.crt"),
            "--clientkey", str(tmp_path / "client.key"),
            "--clientcert", str(tmp_path / "client.crt"),
            "--trust", str(tmp_path / "ca.crt"),
            "--listen", "127.0.0.1:0", "--pac-listen", "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for_line(process, r"Proxy listening addresses=127\.0\.0\.1:\d+")
        process.send_signal(signal_number)
        wait_for_line(process, rf"Stopping signal={signal.Signals(signal_number).name}")
        assert process.wait(timeout=PROCESS_TIMEOUT_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT_SECONDS)


def write_site(directory: Path) -> list[str]:
    """Write a CA and a client identity; return serve's arguments for them."""
    ca = make_ca()
    ca.write(directory, "ca")
    issue(ca, "client", client=True).write(directory, "client")
    return [
        "serve", str(directory / "ca.key"), str(directory / "ca.crt"),
        "--clientkey", str(directory / "client.key"),
        "--clientcert", str(directory / "client.crt"),
        "--listen", "127.0.0.1:0", "--pac-listen", "127.0.0.1:0",
    ]  # fmt: skip


def test_init_file_system_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    result = run_cli("init", "--dir", str(blocker / "sub"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "cannot write the CA" in result.stderr
    assert "Traceback" not in result.stderr


def test_init_leaves_no_temporary_files(tmp_path: Path) -> None:
    result = run_cli("init", "--dir", str(tmp_path))
    assert result.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca.crt").stat().st_mode & 0o777 == 0o644


def test_startup_error_is_one_line(tmp_path: Path) -> None:
    # The identities load, logging at INFO, before binding the port fails.
    arguments = write_site(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(*arguments, "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("kmsproxy: error: ")
    assert f"127.0.0.1:{port}" in result.stderr


def test_world_readable_key_warns(tmp_path: Path) -> None:
    arguments = write_site(tmp_path)
    (tmp_path / "client.key").chmod(0o644)
    result = run_cli(*arguments, "--trust", str(tmp_path / "missing.pem"))
    assert result.returncode == 2
    assert f"path={tmp_path / 'client.key'}" in result.stderr
    assert "role=client key" in result.stderr
    assert "ca.key" not in result.stderr.split("kmsproxy: error:")[0]


def test_certificate_as_key_no_mode_warning(tmp_path: Path) -> None:
    # A certificate given as the client key fails with its own error, and
    # its usual 0644 mode is no reason for a warning before it.
    arguments = write_site(tmp_path)
    arguments[arguments.index("--clientkey") + 1] = str(tmp_path / "client.crt")
    (tmp_path / "client.crt").chmod(0o644)
    result = run_cli(*arguments)
    assert result.returncode == 2
    assert "readable by every user" not in result.stderr


def test_swapped_ca_arguments_hint(tmp_path: Path) -> None:
    arguments = write_site(tmp_path)
    arguments[1], arguments[2] = arguments[2], arguments[1]
    result = run_cli(*arguments)
    assert result.returncode == 2
    assert "contains a certificate" in result.stderr
    assert "the order is CAKEY CACERT" in result.stderr


def test_swapped_go_form_hint(tmp_path: Path) -> None:
    write_site(tmp_path)
    result = run_cli(
        "serve", str(tmp_path / "client.key"), str(tmp_path / "ca.key"),
        str(tmp_path / "ca.crt"), "--clientcert", str(tmp_path / "client.crt"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "the order is KMSURI CERT KEY" in result.stderr


def test_missing_backend_names_folder(
    tmp_path: Path, core_only: None, capsys: pytest.CaptureFixture[str]
) -> None:
    key, cert = make_ca().write(tmp_path, "ca")
    status = main([
        "serve", str(key), str(cert), "--clientkey", "yubikey:slot-id=9a",
        "--clientcert", str(cert),
    ])  # fmt: skip
    errors = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("kmsproxy: error: ")
    ]
    assert status == 2
    assert len(errors) == 1
    assert "kmsproxy-yubikey provides it" in errors[0]
    assert "`pip install ./packages/kmsproxy-yubikey`" in errors[0]
    assert "pip install kmsproxy-yubikey" not in errors[0]


def test_missing_pac_fails_once(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pac"
    result = run_cli(*write_site(tmp_path), "--pac", str(missing))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.count("the PAC file was not found") == 1
    assert f"--pac {missing}" in result.stderr
    assert "browsers will get 404" not in result.stderr


# `unshare -rn` runs the CLI in a new network namespace that has only its own
# loopback interface, so a socket bound to 0.0.0.0 there is not reachable
# from anywhere else.
UNSHARE = shutil.which("unshare")


def can_unshare_network() -> bool:
    if UNSHARE is None:
        return False
    result = subprocess.run(
        [UNSHARE, "-rn", "true"],
        capture_output=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        check=False,
    )
    return result.returncode == 0


@pytest.mark.skipif(
    not can_unshare_network(), reason="needs `unshare -rn` (a network namespace)"
)
def test_exposed_listen_warns_once(tmp_path: Path) -> None:
    assert UNSHARE is not None
    arguments = write_site(tmp_path)
    process = subprocess.Popen(
        [
            UNSHARE, "-rn", sys.executable, "-m", "kmsproxy", *arguments,
            "--listen", "0.0.0.0:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stderr is not None
    lines: list[str] = []
    try:
        # Every line up to the start, then the rest once stopped: a warning
        # that the CLI logs itself comes before the proxy's start line.
        deadline = time.monotonic() + PROCESS_TIMEOUT_SECONDS
        while time.monotonic() < deadline and (line := process.stderr.readline()):
            lines.append(line)
            if "Proxy listening" in line:
                break
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
        # Not `communicate`, which reads the pipe past the text buffer that
        # `readline` filled, and so would lose lines already buffered there.
        rest = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
    output = "".join(lines) + rest
    assert process.returncode == 0, output
    assert re.search(r"Proxy listening addresses=0\.0\.0\.0:\d+", output)
    assert output.count("non-loopback address address=0.0.0.0:") == 1
    assert "beyond this machine" not in output


def test_serve_handles_sighup() -> None:
    args = parse_serve("a", "b", "--clientkey", "k", "--clientcert", "c")
    assert config_from_args(args).handle_signals is True


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def startup_buffer() -> Iterator[tuple[StartupLogBuffer, ListHandler]]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    for handler in saved_handlers:
        root.removeHandler(handler)
    sink = ListHandler()
    root.addHandler(sink)
    root.setLevel(logging.DEBUG)
    buffer = StartupLogBuffer.install()
    try:
        yield buffer, sink
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


def test_startup_warning_shown_at_once(
    startup_buffer: tuple[StartupLogBuffer, ListHandler],
) -> None:
    _, sink = startup_buffer
    logging.getLogger("kmsproxy.test").warning("touch the key")
    assert sink.messages == ["touch the key"]


def test_startup_info_held_until_listening(
    startup_buffer: tuple[StartupLogBuffer, ListHandler],
) -> None:
    buffer, sink = startup_buffer
    logging.getLogger("kmsproxy.test").info("opened key")
    assert sink.messages == []
    buffer.emit_held()
    assert sink.messages == ["opened key"]


def test_startup_held_records_capped(
    startup_buffer: tuple[StartupLogBuffer, ListHandler],
) -> None:
    buffer, sink = startup_buffer
    for number in range(MAX_HELD_RECORDS + 5):
        logging.getLogger("kmsproxy.test").info("line %d", number)
    buffer.emit_held()
    assert len(sink.messages) == MAX_HELD_RECORDS
    assert sink.messages[-1] == f"line {MAX_HELD_RECORDS + 4}"


# A misspelt attribute per backend; each backend's parser raises ValueError.
TYPO_URIS = [
    "awskms:key-id=alias/k;regoin=eu-west-1",
    "pkcs11:module-path=softhsm2;token=dev;id=%01?pinsource=/x",
    "yubikey:slot-id=9b",
]

# Keeps botocore from asking an instance metadata address for credentials.
NO_CLOUD_ENV = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ACCESS_KEY_ID": "AKIAKMSPROXYTEST0001",
    "AWS_SECRET_ACCESS_KEY": "kmsproxy-test-secret-not-a-real-key",
}


@pytest.mark.parametrize("uri", TYPO_URIS)
def test_csr_uri_typo_is_one_line(uri: str) -> None:
    result = run_cli("csr", uri, "--subject", "CN=x", env=NO_CLOUD_ENV)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"kmsproxy: error: {uri.split(';')[0]}")


@pytest.mark.parametrize("uri", TYPO_URIS)
def test_serve_uri_typo_is_one_line(uri: str, tmp_path: Path) -> None:
    key, cert = make_ca().write(tmp_path, "ca")
    result = run_cli(
        "serve", str(key), str(cert), "--clientkey", uri, "--clientcert", str(cert),
        "--listen", "127.0.0.1:0", "--pac-listen", "127.0.0.1:0",
        env=NO_CLOUD_ENV,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("kmsproxy: error: ")
