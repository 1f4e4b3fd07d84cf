"""`kmsproxy serve` with step-kmsproxy-plugin's command line, `KMSURI CERT KEY`."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import Peer, free_port, start_nginx
from pki import issue, make_ca
from test_cli import PROCESS_TIMEOUT_SECONDS, parse_serve, run_cli, wait_for_line

from kmsproxy.cli.serve import backend_options, config_from_args
from kmsproxy.config import DEFAULT_LISTEN
from kmsproxy.errors import UserError

# Upper bound for one curl request through the proxy. On loopback it takes
# milliseconds.
REQUEST_TIMEOUT_SECONDS = 20.0


def test_go_form_config() -> None:
    args = parse_serve(
        "--cacert", "cluster-ca.crt", "--pac", "proxy.pac",
        "tpmkms:name=mykey", "ca.crt", "ca.key",
    )  # fmt: skip
    config = config_from_args(args)
    assert list(config.client_keys) == ["tpmkms:name=mykey"]
    assert list(config.client_certificates) == ["tpmkms:name=mykey"]
    assert config.ca_certificate == "ca.crt"
    assert config.ca_key == "ca.key"
    assert list(config.trust) == [Path("cluster-ca.crt")]
    assert config.pac_file == Path("proxy.pac")
    assert config.listen == DEFAULT_LISTEN


def test_go_form_options_between_positionals() -> None:
    # step-kmsproxy-plugin's parser accepts options anywhere.
    args = parse_serve(
        "tpmkms:name=mykey", "--cacert", "cluster-ca.crt", "ca.crt",
        "--verbose", "ca.key",
    )  # fmt: skip
    config = config_from_args(args)
    assert list(config.client_keys) == ["tpmkms:name=mykey"]
    assert config.ca_certificate == "ca.crt"
    assert config.ca_key == "ca.key"
    assert list(config.trust) == [Path("cluster-ca.crt")]


def test_misspelt_option_names_closest() -> None:
    result = run_cli("serve", "--clientcrt", "client.crt")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("kmsproxy serve: error: unrecognized arguments")
    assert "did you mean --clientcert?" in result.stderr
    assert result.stderr.endswith("(see `kmsproxy serve --help`)\n")


@pytest.mark.parametrize(
    ("command", "prefix", "option"),
    [
        ("serve", "--ins", "--insecure-skip-verify"),
        ("serve", "--insecure", "--insecure-skip-verify"),
        ("init", "--forc", "--force"),
    ],
)
def test_option_prefix_is_rejected(command: str, prefix: str, option: str) -> None:
    # A prefix must not switch on an option as dangerous as these two.
    result = run_cli(command, prefix)
    assert result.returncode == 2
    assert f"unrecognized arguments: {prefix}" in result.stderr
    assert f"did you mean {option}?" in result.stderr


@pytest.mark.parametrize("port", ["abc", "65536", "-1", "\u00b2"])
def test_pac_port_out_of_range(port: str) -> None:
    result = run_cli("serve", f"--pac-port={port}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"--pac-port: {port!r} is not a port number (0 to 65535)" in result.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        ("init", "--ke", "yubikey:slot-id=9a?pin-value=123456"),
        ("serve", "--clientkye=pkcs11:token=t;object=o?pin-value=123456"),
        ("init", "--pin", "123456"),
    ],
)
def test_unknown_option_hides_values(arguments: tuple[str, ...]) -> None:
    result = run_cli(*arguments)
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
    assert "123456" not in result.stderr


def test_unknown_option_without_match() -> None:
    result = run_cli("serve", "ca.key", "--zzzz", "ca.crt")
    assert result.returncode == 2
    assert "unrecognized arguments: --zzzz" in result.stderr
    assert "did you mean" not in result.stderr


def test_go_form_clientcert_overrides() -> None:
    args = parse_serve("client.key", "ca.crt", "ca.key", "--clientcert", "chain.pem")
    config = config_from_args(args)
    assert list(config.client_keys) == ["client.key"]
    assert list(config.client_certificates) == ["chain.pem"]


def test_go_form_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kmsproxy.cli.serve")
    config_from_args(parse_serve("tpmkms:name=k", "ca.crt", "ca.key"))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert messages == ["Positional arguments form='KMSURI CERT KEY'"]


def test_our_form_still_parses() -> None:
    args = parse_serve("ca.key", "ca.crt", "--clientkey", "k", "--clientcert", "c")
    config = config_from_args(args)
    assert config.ca_key == "ca.key"
    assert config.ca_certificate == "ca.crt"
    assert list(config.client_keys) == ["k"]
    assert list(config.client_certificates) == ["c"]


def test_go_form_rejects_clientkey() -> None:
    args = parse_serve("k", "ca.crt", "ca.key", "--clientkey", "k2")
    with pytest.raises(UserError, match="drop --clientkey"):
        config_from_args(args)


@pytest.mark.parametrize("count", [1, 4])
def test_wrong_positional_count(count: int) -> None:
    args = parse_serve(*[f"arg{i}" for i in range(count)], "--clientkey", "k")
    with pytest.raises(UserError) as raised:
        config_from_args(args)
    message = str(raised.value)
    assert f"got {count}" in message
    assert "CAKEY CACERT" in message
    assert "KMSURI CERT KEY" in message


def test_two_positionals_need_clientkey() -> None:
    # step-kmsproxy-plugin's older CLIENTKEY CAKEY form.
    args = parse_serve("client.key", "ca.key", "--clientcert", "client.crt")
    with pytest.raises(UserError, match="older CLIENTKEY CAKEY form"):
        config_from_args(args)


def test_no_arguments_show_both_forms() -> None:
    with pytest.raises(UserError) as raised:
        config_from_args(parse_serve())
    message = str(raised.value)
    assert message.startswith("missing --clientkey: ")
    assert "CAKEY CACERT" in message
    assert "KMSURI CERT KEY" in message


def test_clientkey_needs_clientcert() -> None:
    args = parse_serve("ca.key", "ca.crt", "--clientkey", "k")
    with pytest.raises(UserError, match="missing --clientcert"):
        config_from_args(args)


def test_usage_error_is_one_line() -> None:
    result = run_cli("serve", "only-one")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("kmsproxy: error: expected 0, 2 or 3")


@pytest.mark.parametrize("address", ["unix:/tmp/kmsproxy.sock", "systemd:"])
def test_listen_scheme_rejected(address: str) -> None:
    result = run_cli("serve", "k", "ca.crt", "ca.key", "--listen", address)
    assert result.returncode == 2
    error_line = result.stderr.splitlines()[-1]
    assert error_line.startswith(f"kmsproxy: error: --listen {address}: ")
    assert "not supported" in error_line
    assert "tcp:HOST:PORT" in error_line
    assert "Traceback" not in result.stderr


@dataclass
class Site:
    """A local CA, a client identity and an nginx upstream that requires it."""

    directory: Path
    nginx: Peer

    def path(self, name: str) -> Path:
        return self.directory / name


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    local_ca = make_ca("kmsproxy test local CA")
    upstream_ca = make_ca("upstream CA")
    client_ca = make_ca("client CA")
    client = issue(client_ca, "proxy client", client=True)
    server = issue(
        upstream_ca, "localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",)
    )
    local_ca.write(tmp_path, "ca")
    client.write(tmp_path, "client")
    server.write(tmp_path, "server")
    combined = tmp_path / "client-with-chain.pem"
    combined.write_bytes(client.key_pem() + client.chain_pem())
    combined.chmod(0o600)
    (tmp_path / "upstream-ca.crt").write_bytes(upstream_ca.chain_pem())
    (tmp_path / "client-ca.crt").write_bytes(client_ca.chain_pem())
    with start_nginx(
        tmp_path,
        tmp_path / "server.crt",
        tmp_path / "server.key",
        tmp_path / "client-ca.crt",
    ) as nginx:
        yield Site(tmp_path, nginx)


def serve_go_form(site: Site, key_uri: Path, *options: str) -> subprocess.Popen[str]:
    """Start `kmsproxy serve` with the Go tool's arguments, as its users write them."""
    return subprocess.Popen(
        [
            sys.executable, "-m", "kmsproxy", "serve",
            "--cacert", str(site.path("upstream-ca.crt")),
            "--listen", "tcp:127.0.0.1:0",
            "--pac-port", str(free_port()),
            *options,
            str(key_uri), str(site.path("ca.crt")), str(site.path("ca.key")),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=PROCESS_TIMEOUT_SECONDS)


def fetch_subject(site: Site, process: subprocess.Popen[str]) -> str:
    """Wait for the proxy to listen, then GET nginx's /subject through it with curl."""
    if shutil.which("curl") is None:
        pytest.fail("curl not found on PATH (install the Debian package curl)")
    listening = wait_for_line(process, r"Proxy listening addresses=127\.0\.0\.1:(\d+)")
    result = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--max-time", "10",
            "--proxy", f"http://127.0.0.1:{listening.group(1)}",
            "--cacert", str(site.path("ca.crt")),
            f"https://localhost:{site.nginx.port}/subject",
        ],
        capture_output=True,
        text=True,
        timeout=REQUEST_TIMEOUT_SECONDS,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        stop(process)
        assert process.stderr is not None
        raise AssertionError(f"{result.stderr}\nproxy output:\n{process.stderr.read()}")
    return result.stdout


def test_go_form_chain_in_key_file(site: Site) -> None:
    process = serve_go_form(site, site.path("client-with-chain.pem"))
    try:
        wait_for_line(process, r"Positional arguments form='KMSURI CERT KEY'")
        assert fetch_subject(site, process) == "subject=CN=proxy client\n"
    finally:
        stop(process)
    assert site.nginx.client_subjects() == ["CN=proxy client"]


def test_go_form_with_clientcert(site: Site) -> None:
    process = serve_go_form(
        site, site.path("client.key"), "--clientcert", str(site.path("client.crt"))
    )
    try:
        assert fetch_subject(site, process) == "subject=CN=proxy client\n"
    finally:
        stop(process)
    assert site.nginx.client_subjects() == ["CN=proxy client"]


def test_serve_on_uvloop(site: Site) -> None:
    process = serve_go_form(
        site, site.path("client-with-chain.pem"), "--event-loop", "uvloop"
    )
    try:
        wait_for_line(process, r"Event loop name=uvloop")
        assert fetch_subject(site, process) == "subject=CN=proxy client\n"
    finally:
        stop(process)


def test_missing_uvloop_names_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "uvloop" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(UserError, match="pipx inject kmsproxy-core uvloop"):
        backend_options("uvloop")


def test_go_form_key_without_chain(site: Site) -> None:
    process = serve_go_form(site, site.path("client.key"))
    try:
        assert process.wait(timeout=PROCESS_TIMEOUT_SECONDS) == 2
        assert process.stderr is not None
        output = process.stderr.read()
    finally:
        stop(process)
    error_line = output.splitlines()[-1]
    assert error_line.startswith(f"kmsproxy: error: {site.path('client.key')}: ")
    assert "add --clientcert" in error_line
    assert "Traceback" not in output
