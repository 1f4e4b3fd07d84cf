"""The processes a benchmark run starts on loopback, and the keys they use.

Every path under test ends at one upstream nginx that requires a client
certificate. The paths differ in what sits between the client and it:
nothing (direct), kmsproxy, mitmproxy, or a second nginx that terminates
TLS and opens its own mTLS connection upstream. Each `start_*` function
starts one process, waits (bounded) until it accepts TCP connections and
returns a `Process`, which `stop()` ends by its PID.

Keys and certificates come from the core tests' `pki.py` and live only in
the run's temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packages" / "kmsproxy-core" / "tests"))

import pki  # noqa: E402  (the core tests' helper, found through sys.path)
from peers import free_port as free_port  # noqa: E402

LOOPBACK = "127.0.0.1"
LOOPBACK_V6 = "::1"

# The name every client asks for. It resolves to both loopback addresses,
# so the upstream listens on both and no proxy waits for a refused ::1.
SERVER_NAME = "localhost"

# Seconds a started process gets to accept connections. Python proxies
# import for a second or two on an idle machine; this bound is an estimate
# that leaves room for a loaded 2-core machine.
READY_TIMEOUT_SECONDS = 30.0

# Delay between readiness probes.
READY_POLL_SECONDS = 0.01

# Seconds a process gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT_SECONDS = 10.0

# nginx connections per worker: 1,000 idle tunnels need 1,000 upstream
# connections, and the terminator needs two per tunnel, with room to spare.
NGINX_WORKER_CONNECTIONS = 4096

# Size of the small response body in bytes, typical of an API response.
SMALL_BODY_BYTES = 1024


class StartError(Exception):
    """A benchmark process failed to start; the message includes its log."""


@dataclass
class Process:
    """A process started by the benchmark, stopped by PID."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def rss_bytes(self) -> int:
        """Read the resident set size from /proc (Linux only)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise StartError(f"{self.name}: no VmRSS in /proc/{self.pid}/status")

    def stop(self) -> None:
        """Send SIGTERM, then SIGKILL after STOP_TIMEOUT_SECONDS."""
        if self.popen.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)


def spawn(name: str, argv: Sequence[str], directory: Path) -> Process:
    """Start `argv` with its output in `directory/NAME.log`."""
    log_path = directory / f"{name}.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    return Process(name, popen, log_path)


def wait_for_port(process: Process, port: int) -> None:
    """Wait until `process` accepts TCP on 127.0.0.1:`port`, or raise."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise StartError(
                f"{process.name} exited with status {process.popen.returncode}; "
                f"its log:\n{process.log()}"
            )
        with contextlib.suppress(OSError):
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        time.sleep(READY_POLL_SECONDS)
    process.stop()
    raise StartError(
        f"{process.name} did not accept connections on port {port} within "
        f"{READY_TIMEOUT_SECONDS:g} s; its log:\n{process.log()}"
    )


def require(program: str) -> str:
    """Return the path of `program`, searching /usr/sbin too (nginx)."""
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin")
    if path is None:
        raise StartError(f"{program} not found (install the Debian package)")
    return path


@dataclass(frozen=True)
class Keys:
    """The PEM files that one run generates, and its client CA."""

    upstream_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    # Certificate and key in one file, as mitmproxy's client_certs takes it.
    client_combined: Path
    proxy_ca_cert: Path
    proxy_ca_key: Path
    # The client CA itself, to certify keys made in a TPM or a token.
    client_issuer: pki.Issued


def make_keys(directory: Path) -> Keys:
    """Generate every CA, certificate and key of a run under `directory`."""
    upstream_ca = pki.make_ca("bench upstream CA")
    server = pki.issue(
        upstream_ca,
        SERVER_NAME,
        dns_names=(SERVER_NAME,),
        ip_addresses=(LOOPBACK, LOOPBACK_V6),
    )
    client_ca = pki.make_ca("bench client CA")
    client = pki.issue(client_ca, "bench client", client=True)
    proxy_ca = pki.make_ca("bench kmsproxy CA")

    (directory / "upstream-ca.crt").write_bytes(upstream_ca.chain_pem())
    (directory / "client-ca.crt").write_bytes(client_ca.chain_pem())
    server_key, server_cert = server.write(directory, "server")
    client_key, client_cert = client.write(directory, "client")
    combined = directory / "client-combined.pem"
    combined.write_bytes(client.chain_pem() + client.key_pem())
    combined.chmod(0o600)
    proxy_ca_key, proxy_ca_cert = proxy_ca.write(directory, "kmsproxy-ca")
    return Keys(
        upstream_ca=directory / "upstream-ca.crt",
        server_cert=server_cert,
        server_key=server_key,
        client_ca=directory / "client-ca.crt",
        client_cert=client_cert,
        client_key=client_key,
        client_combined=combined,
        proxy_ca_cert=proxy_ca_cert,
        proxy_ca_key=proxy_ca_key,
        client_issuer=client_ca,
    )


# The upstream's three listeners. `resumed` issues session tickets and
# `full` does not, so every handshake on it is a full one with a client
# signature. `counted` issues tickets like `resumed` but is used only by
# the signer-call measurement, so no earlier step has warmed a cache for it.
UPSTREAM_LISTENERS = ("resumed", "full", "counted")

_NGINX_HEAD = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    ssl_protocols TLSv1.3;
    # One line per request: connection serial number and "r" for a resumed
    # session, "." for a full handshake with a client signature.
    log_format handshakes '$connection $ssl_session_reused';
"""

_UPSTREAM_SERVER = """\
    server {{
        listen {host}:{port} ssl;
        listen [{host6}]:{port} ssl;
        server_name {server_name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {client_ca};
        ssl_verify_client on;
        ssl_session_tickets {tickets};
        ssl_session_cache {session_cache};
        access_log {directory}/{name}.access.log handshakes buffer=64k flush=100ms;
        root {content};
        location /upload/ {{
            client_max_body_size 0;
            client_body_buffer_size 1m;
            dav_methods PUT;
        }}
    }}
"""

_TERMINATOR_SERVER = """\
    server {{
        listen {host}:{port} ssl;
        server_name {server_name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_tickets {tickets};
        location / {{
            proxy_pass https://{host}:{upstream_port};
            proxy_http_version 1.1;
            proxy_ssl_name {server_name};
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate {client_cert};
            proxy_ssl_certificate_key {client_key};
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {upstream_ca};
            proxy_ssl_session_reuse {reuse};
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
            client_max_body_size 0;
        }}
    }}
"""


@dataclass
class Upstream:
    """The upstream nginx: one process, a port per listener."""

    process: Process
    ports: dict[str, int]
    directory: Path

    def handshake_counts(self, listener: str) -> tuple[int, int]:
        """Return (full, resumed) handshakes logged so far on `listener`.

        Each connection is counted once, by its first logged request.
        """
        path = self.directory / f"{listener}.access.log"
        seen: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text().splitlines():
                serial, _, reused = line.partition(" ")
                seen.setdefault(serial, reused)
        full = sum(1 for reused in seen.values() if reused != "r")
        return full, len(seen) - full


def start_upstream(directory: Path, keys: Keys, content: Path) -> Upstream:
    """Start the upstream nginx serving `content` (GET) and /upload/ (PUT)."""
    ports = {name: free_port() for name in UPSTREAM_LISTENERS}
    servers = [
        _UPSTREAM_SERVER.format(
            host=LOOPBACK,
            host6=LOOPBACK_V6,
            port=ports[name],
            server_name=SERVER_NAME,
            cert=keys.server_cert,
            key=keys.server_key,
            client_ca=keys.client_ca,
            tickets="off" if name == "full" else "on",
            session_cache="off" if name == "full" else "shared:bench_" + name + ":8m",
            directory=directory,
            name=name,
            content=content,
        )
        for name in UPSTREAM_LISTENERS
    ]
    process = _start_nginx("upstream-nginx", directory, servers, ports)
    return Upstream(process, ports, directory)


def start_terminator(
    directory: Path, keys: Keys, upstream: Upstream
) -> tuple[Process, dict[str, int]]:
    """Start nginx terminating TLS and re-originating mTLS to the upstream.

    It has one listener per upstream listener; session reuse towards the
    upstream is on except for `full`.
    """
    ports = {name: free_port() for name in UPSTREAM_LISTENERS}
    servers = [
        _TERMINATOR_SERVER.format(
            host=LOOPBACK,
            port=ports[name],
            server_name=SERVER_NAME,
            cert=keys.server_cert,
            key=keys.server_key,
            tickets="off" if name == "full" else "on",
            upstream_port=upstream.ports[name],
            client_cert=keys.client_cert,
            client_key=keys.client_key,
            upstream_ca=keys.upstream_ca,
            reuse="off" if name == "full" else "on",
        )
        for name in UPSTREAM_LISTENERS
    ]
    process = _start_nginx("terminator-nginx", directory, servers, ports)
    return process, ports


def _start_nginx(
    name: str, directory: Path, servers: list[str], ports: dict[str, int]
) -> Process:
    """Write nginx.conf with `servers` blocks, start nginx, and wait for
    every port in `ports`."""
    config = directory / "nginx.conf"
    config.write_text(_nginx_head(directory) + "".join(servers) + "}\n")
    process = spawn(name, _nginx_argv(directory, config), directory)
    for port in ports.values():
        wait_for_port(process, port)
    return process


def _nginx_head(directory: Path) -> str:
    return _NGINX_HEAD.format(
        directory=directory,
        connections=NGINX_WORKER_CONNECTIONS,
        nofile=2 * NGINX_WORKER_CONNECTIONS,
    )


def _nginx_argv(directory: Path, config: Path) -> list[str]:
    return [require("nginx"), "-p", str(directory), "-c", str(config), "-e", "stderr"]


def kmsproxy_argv(
    python: Path, keys: Keys, port: int, key_argument: str, cert_argument: str
) -> list[str]:
    """Return the `kmsproxy serve` command line for one key source."""
    return [
        str(python),
        "-m",
        "kmsproxy",
        "serve",
        str(keys.proxy_ca_key),
        str(keys.proxy_ca_cert),
        "--clientkey",
        key_argument,
        "--clientcert",
        cert_argument,
        "--trust",
        str(keys.upstream_ca),
        "--listen",
        f"{LOOPBACK}:{port}",
        "--pac-listen",
        f"{LOOPBACK}:{free_port()}",
    ]


def mitmproxy_argv(mitmdump: Path, keys: Keys, port: int, confdir: Path) -> list[str]:
    """Return a mitmdump command line in regular mode with our client cert.

    Bodies over 1 MiB are streamed; without it mitmproxy keeps a whole
    1 GiB response in memory before it passes any of it on.
    """
    return [
        str(mitmdump),
        "--mode",
        "regular",
        "--listen-host",
        LOOPBACK,
        "--listen-port",
        str(port),
        "--set",
        f"confdir={confdir}",
        "--set",
        f"client_certs={keys.client_combined}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={keys.upstream_ca}",
        "--set",
        "stream_large_bodies=1m",
        "--set",
        "flow_detail=0",
        "--set",
        "termlog_verbosity=warn",
    ]


def mitmproxy_ca(confdir: Path) -> Path:
    """Return the CA certificate mitmproxy created in `confdir` on start."""
    return confdir / "mitmproxy-ca-cert.pem"
