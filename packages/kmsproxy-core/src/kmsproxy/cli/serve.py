"""`kmsproxy serve`: run the proxy until SIGINT or SIGTERM.

Two positional forms are accepted. Ours is `[CAKEY CACERT]` with the client
identities in `--clientkey` and `--clientcert`. The Go tool
step-kmsproxy-plugin's is `KMSURI CERT KEY`: one client key URI, whose
certificate chain is read from the same URI, then the local CA's certificate
and key. The count of positional arguments selects the form.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import stat
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from kmsproxy.certificates import CertificateError
from kmsproxy.config import DEFAULT_LISTEN, DEFAULT_PAC_LISTEN, ProxyConfig
from kmsproxy.errors import UserError
from kmsproxy.proxy import Proxy, ProxyAddresses
from kmsproxy.uri import KeyURI, URIError, looks_like_uri

logger = logging.getLogger(__name__)

# INFO and DEBUG records held during startup, newest kept. Startup logs a
# few dozen lines even with --verbose; the cap only bounds a backend that
# logs in a loop while it waits for a device.
MAX_HELD_RECORDS = 1000

CA_KEY_NAME = "ca.key"

# Bytes read from the start of a CA key file to tell a certificate from a
# key; PEM headers sit at the start, and a key is a few KiB at most.
MAX_KEY_SNIFF_BYTES = 64 * 1024
CA_CERTIFICATE_NAME = "ca.crt"

# File that `kmsproxy init --key` writes beside ca.crt: one line with the
# CA key's URI or path, without secrets, which `serve` uses as the default
# CA key when there is no ca.key.
CA_KEY_URI_NAME = "ca.key-uri"

# Largest ca.key-uri read: one key URI, which is well under 1 KiB.
MAX_KEY_URI_FILE_BYTES = 8 * 1024

# Names of the two positional forms, as logged and shown in errors.
FORM_KMSPROXY = "CAKEY CACERT"
FORM_GO_TOOL = "KMSURI CERT KEY"

BOTH_FORMS = (
    "`kmsproxy serve [CAKEY CACERT] --clientkey KEY --clientcert CERT`, "
    "or step-kmsproxy-plugin's `kmsproxy serve KMSURI CERT KEY`"
)

# `--listen` schemes of step-kmsproxy-plugin that kmsproxy does not serve.
# The listener binds TCP sockets only, so a Unix socket or a socket passed
# in by systemd would need a change there.
UNSUPPORTED_LISTEN_SCHEMES = {
    "unix": "Unix sockets (unix:PATH) are not supported",
    "systemd": "systemd socket activation (systemd:) is not supported",
}


def config_directory() -> Path:
    """Return `$XDG_CONFIG_HOME/kmsproxy`, by default `~/.config/kmsproxy`."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kmsproxy"


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "serve",
        help="run the proxy",
        usage=(
            "%(prog)s [-h] [CAKEY CACERT] --clientkey KEY --clientcert CERT "
            "[options]\n"
            "       %(prog)s [-h] KMSURI CERT KEY [--clientcert CERT] [options]"
        ),
        description=(
            "Listen for HTTP CONNECT (plain or TLS) and open each tunnel with "
            "the client certificate. CAKEY and CACERT default to ca.key (or "
            "the key URI in ca.key-uri, written by `kmsproxy init --key`) and "
            f"ca.crt in {config_directory()} (see `kmsproxy init`). Three "
            "positionals are step-kmsproxy-plugin's form: the client key URI, "
            "whose certificate chain is read from the same URI, then the CA "
            "certificate and the CA key."
        ),
    )
    add_serve_arguments(parser)
    parser.set_defaults(handler=run)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # argparse reads the positionals only as one run. Words left after the
    # options join them in `kmsproxy.cli.parse_command_line`, so the Go
    # tool's `KMSURI --cacert F CERT KEY` works too.
    parser.add_argument(
        "positionals",
        nargs="*",
        metavar="ARG",
        help=(
            "CAKEY CACERT: the local CA's key and certificate (each a path or "
            "URI); "
            "or KMSURI CERT KEY: the client key URI, then the local CA's "
            "certificate and key"
        ),
    )
    parser.add_argument(
        "--clientkey",
        action="append",
        metavar="KEY",
        help="client key path or URI (repeat for several identities)",
    )
    parser.add_argument(
        "--clientcert",
        action="append",
        metavar="CERT",
        help=(
            "client certificate chain path or URI (repeat; paired by key); "
            "with KMSURI CERT KEY it replaces KMSURI as the chain's source"
        ),
    )
    parser.add_argument(
        "--trust",
        "--cacert",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="PEM bundle of upstream CAs to trust besides the system store",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR",
        help=f"proxy address: host:port, tcp:host:port or [v6]:port "
        f"(default {DEFAULT_LISTEN}); unix: and systemd: are not supported",
    )
    parser.add_argument(
        "--pac-listen",
        default=None,
        metavar="ADDR",
        help=f"PAC server address (default {DEFAULT_PAC_LISTEN})",
    )
    parser.add_argument(
        "--pac-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="PAC server port on localhost (the Go tool's flag)",
    )
    parser.add_argument("--pac", type=Path, metavar="FILE", help="PAC file to serve")
    parser.add_argument(
        "--insecure-skip-verify",
        action="store_true",
        help="accept any upstream certificate (for testing only)",
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="asyncio",
        help="the event loop: asyncio (default) or uvloop, an optional speed-up "
        "that needs uvloop installed next to kmsproxy",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log at DEBUG")


# The largest TCP port number. With port 0 the system picks a free port, as
# with `--pac-listen HOST:0`.
MAX_PORT = 65535


def port_number(text: str) -> int:
    """Parse an option's TCP port number, from 0 to `MAX_PORT`."""
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port number (0 to {MAX_PORT})"
        )
    return int(text)


# The event loops `--event-loop` accepts. uvloop is an optional dependency
# (the `uvloop` extra). The proxy behaves the same on both: the relay and
# TLS stream tests run on each.
EVENT_LOOPS = ("asyncio", "uvloop")


def backend_options(event_loop: str) -> dict[str, bool]:
    """Return anyio's asyncio backend options for `--event-loop`.

    Raise `UserError` when uvloop is requested but not installed.
    """
    if event_loop != "uvloop":
        return {"use_uvloop": False}
    if importlib.util.find_spec("uvloop") is None:
        raise UserError(
            "--event-loop uvloop: uvloop is not installed; add it to the "
            "environment that runs kmsproxy with `pipx inject kmsproxy-core "
            "uvloop` (pipx) or `pip install uvloop` (in that environment)"
        )
    return {"use_uvloop": True}


@dataclass(frozen=True)
class PositionalForm:
    """The CA and client identities that the positional arguments name."""

    name: str
    ca_key: str | Path
    ca_certificate: str | Path
    client_keys: Sequence[str]
    client_certificates: Sequence[str]
    # The Go form's KMSURI when the chain is read from it (no --clientcert).
    chain_from_key_uri: str | None = None


def read_positional_form(args: argparse.Namespace) -> PositionalForm:
    """Tell the two positional forms apart by count and check their options.

    Raise `UserError` naming both forms for any other count, and for
    `--clientkey` or `--clientcert` missing where the form needs them.
    """
    positionals: list[str] = args.positionals
    client_keys: list[str] = args.clientkey or []
    client_certificates: list[str] = args.clientcert or []

    if len(positionals) == 3:
        if client_keys:
            raise UserError(
                "three positionals are step-kmsproxy-plugin's KMSURI CERT KEY, "
                "where KMSURI is the client key: drop --clientkey, or give "
                "CAKEY CACERT with --clientkey and --clientcert"
            )
        key_uri = positionals[0]
        return PositionalForm(
            name=FORM_GO_TOOL,
            ca_key=positionals[2],
            ca_certificate=positionals[1],
            client_keys=[key_uri],
            client_certificates=client_certificates or [key_uri],
            chain_from_key_uri=None if client_certificates else key_uri,
        )

    if len(positionals) not in (0, 2):
        raise UserError(
            f"expected 0, 2 or 3 positional arguments, got {len(positionals)}: "
            f"use {BOTH_FORMS}"
        )
    if not client_keys and positionals:
        # step-kmsproxy-plugin's older form was CLIENTKEY CAKEY, with the CA
        # certificate in --cacert, which kmsproxy reads as upstream trust.
        raise UserError(
            "missing --clientkey: two positionals are CAKEY CACERT, so name "
            "each client key with --clientkey and its chain with --clientcert "
            "(step-kmsproxy-plugin's older CLIENTKEY CAKEY form is not "
            "accepted), or use step-kmsproxy-plugin's KMSURI CERT KEY"
        )
    if not client_keys:
        raise UserError(f"missing --clientkey: use {BOTH_FORMS}")
    if not client_certificates:
        raise UserError(
            "missing --clientcert: give the certificate chain of each --clientkey"
        )
    ca_key: str | Path
    ca_certificate: str | Path
    if positionals:
        ca_key, ca_certificate = positionals[0], positionals[1]
    else:
        ca_key, ca_certificate = default_ca_paths()
    return PositionalForm(
        name=FORM_KMSPROXY,
        ca_key=ca_key,
        ca_certificate=ca_certificate,
        client_keys=client_keys,
        client_certificates=client_certificates,
    )


def default_ca_paths() -> tuple[str | Path, Path]:
    """Return the CA key and certificate that `kmsproxy init` wrote.

    The key is `ca.key`, or else the URI recorded in `ca.key-uri` by
    `kmsproxy init --key`. Raise `UserError` naming the missing file and
    the command to run.
    """
    directory = config_directory()
    ca_key = directory / CA_KEY_NAME
    ca_certificate = directory / CA_CERTIFICATE_NAME
    key_uri_path = directory / CA_KEY_URI_NAME
    if not ca_certificate.exists():
        if ca_key.exists():
            raise UserError(
                f"{ca_key} has no {CA_CERTIFICATE_NAME} beside it: run `kmsproxy "
                "init --force` to create a new CA, or pass CAKEY and CACERT"
            )
        raise UserError(
            f"no local CA in {directory}: run `kmsproxy init` first, "
            "or pass CAKEY and CACERT"
        )
    if ca_key.exists():
        if key_uri_path.exists():
            raise UserError(
                f"{directory} has both {CA_KEY_NAME} and {CA_KEY_URI_NAME}: delete "
                f"the one that is not the key of {CA_CERTIFICATE_NAME}, or pass "
                "CAKEY and CACERT"
            )
        return ca_key, ca_certificate
    if key_uri_path.exists():
        return read_key_uri_file(key_uri_path), ca_certificate
    raise UserError(
        f"{ca_certificate} has no {CA_KEY_NAME} beside it, so its key is in a "
        f"backend (`kmsproxy init --key` writes only {CA_CERTIFICATE_NAME}): "
        f"pass that key and the certificate, as in `kmsproxy serve 'URI' "
        f"{ca_certificate} --clientkey KEY --clientcert CERT`"
    )


def read_key_uri_file(path: Path) -> str:
    """Read the CA key URI from `path` (a `ca.key-uri` file).

    Raise `UserError` for a file that cannot be read or is not one line.
    """
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_URI_FILE_BYTES + 1)
    except OSError as error:
        raise UserError(
            f"{path}: cannot read the CA key URI: {error.strerror or error}; "
            "fix its permissions, or pass CAKEY and CACERT"
        ) from None
    lines = data.decode("utf-8", errors="replace").strip().splitlines()
    if len(data) > MAX_KEY_URI_FILE_BYTES or len(lines) != 1:
        raise UserError(
            f"{path} must contain one line, the CA key's URI or path; run "
            "`kmsproxy init --key URI --force` again, or pass CAKEY and CACERT"
        )
    logger.info("CA key from file path=%s", path)
    return lines[0].strip()


def check_listen_scheme(option: str, address: str) -> None:
    """Reject step-kmsproxy-plugin's listen schemes that are not TCP."""
    scheme, colon, _ = address.partition(":")
    reason = UNSUPPORTED_LISTEN_SCHEMES.get(scheme) if colon else None
    if reason is not None:
        raise UserError(
            f"{option} {address}: {reason}; listen on TCP with tcp:HOST:PORT or "
            f"HOST:PORT, for example tcp:{DEFAULT_LISTEN}"
        )


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """Build the `ProxyConfig` that `serve` (and the demo) runs."""
    return config_from_form(args, read_positional_form(args))


def config_from_form(args: argparse.Namespace, form: PositionalForm) -> ProxyConfig:
    """Build the `ProxyConfig` from the positional form and the options."""
    # Our own form is the default and logged only at DEBUG. The Go form is
    # logged at INFO, so a user moving over can confirm how it was parsed.
    level = logging.INFO if form.name == FORM_GO_TOOL else logging.DEBUG
    logger.log(level, "Positional arguments form=%r", form.name)
    check_listen_scheme("--listen", args.listen)
    if args.pac_listen is not None:
        check_listen_scheme("--pac-listen", args.pac_listen)
    if args.pac_listen is not None and args.pac_port is not None:
        raise UserError("give --pac-listen or --pac-port, not both")
    pac_listen = args.pac_listen or DEFAULT_PAC_LISTEN
    if args.pac_port is not None:
        pac_listen = f"localhost:{args.pac_port}"
    return ProxyConfig(
        ca_key=form.ca_key,
        ca_certificate=form.ca_certificate,
        client_keys=list(form.client_keys),
        client_certificates=list(form.client_certificates),
        trust=list(args.trust),
        listen=args.listen,
        pac_listen=pac_listen,
        pac_file=args.pac,
        insecure_skip_verify=args.insecure_skip_verify,
        # The CLI owns the process, so SIGHUP reloads the identities.
        handle_signals=True,
    )


def run(args: argparse.Namespace) -> int:
    # Log lines from startup wait until the proxy listens, so that a startup
    # error prints as the one line after `kmsproxy: error:`.
    buffer = StartupLogBuffer.install()
    try:
        _run(args, buffer)
    except BaseException:
        # Keep warnings, which may explain the error. --verbose keeps all.
        buffer.emit_held(logging.DEBUG if args.verbose else logging.WARNING)
        raise
    return 0


def _run(args: argparse.Namespace, buffer: StartupLogBuffer) -> None:
    form = read_positional_form(args)
    check_ca_order(form)
    config = config_from_form(args, form)
    warn_about_setup(args, form)
    options = backend_options(args.event_loop)
    try:
        anyio.run(
            serve_until_signal,
            config,
            buffer.emit_held,
            backend="asyncio",
            backend_options=options,
        )
    except Exception as error:
        if form.chain_from_key_uri is not None:
            _explain_missing_chain(error, form.chain_from_key_uri)
        raise


class StartupLogBuffer(logging.Handler):
    """Hold the root logger's INFO and DEBUG records until startup ends.

    WARNING and above pass through at once: a backend may log "touch the
    key" while it opens a key, and the user must see that while it waits.
    The lower records are held so that a startup error prints as the one
    line after `kmsproxy: error:`; at most `MAX_HELD_RECORDS` are kept.
    """

    def __init__(self, handlers: Sequence[logging.Handler]) -> None:
        super().__init__(logging.NOTSET)
        self.handlers = list(handlers)
        self.records: deque[logging.LogRecord] | None = deque(maxlen=MAX_HELD_RECORDS)

    @classmethod
    def install(cls) -> StartupLogBuffer:
        """Put a buffer in place of the root logger's handlers."""
        root = logging.getLogger()
        buffer = cls(root.handlers)
        for handler in buffer.handlers:
            root.removeHandler(handler)
        root.addHandler(buffer)
        return buffer

    def emit(self, record: logging.LogRecord) -> None:
        if self.records is None or record.levelno >= logging.WARNING:
            self._forward(record)
        else:
            self.records.append(record)

    def emit_held(self, level: int = logging.NOTSET) -> None:
        """Emit the held records at `level` or above, then stop holding."""
        if self.records is None:
            return
        records, self.records = self.records, None
        root = logging.getLogger()
        root.removeHandler(self)
        for handler in self.handlers:
            root.addHandler(handler)
        for record in records:
            if record.levelno >= level:
                self._forward(record)

    def _forward(self, record: logging.LogRecord) -> None:
        for handler in self.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def key_file_path(argument: str | Path) -> Path | None:
    """Return the file behind a key argument (path or `file:` URI), if any."""
    text = os.fspath(argument)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not looks_like_uri(text):
        return None
    try:
        uri = KeyURI.parse(text)
    except URIError:
        return None
    value = uri.get("path")
    if uri.scheme != "file" or not value:
        return None
    return Path(value).expanduser()


def check_ca_order(form: PositionalForm) -> None:
    """Raise `UserError` when the CA key argument contains a certificate.

    step-kmsproxy-plugin's form puts the CA certificate before the CA key,
    and ours the key first, so swapping them is an easy mistake.
    """
    path = key_file_path(form.ca_key)
    head = None if path is None else _read_key_head(path)
    if head is None:
        return
    if b"-----BEGIN CERTIFICATE-----" not in head or b"PRIVATE KEY" in head:
        return
    if form.name == FORM_GO_TOOL:
        order = "KMSURI CERT KEY: the CA certificate comes before the CA key"
    else:
        order = (
            "CAKEY CACERT: the CA key comes first (step-kmsproxy-plugin's "
            "KMSURI CERT KEY form takes the certificate first)"
        )
    raise UserError(
        f"{path} is given as the CA key but contains a certificate; the order "
        f"is {order}"
    )


def warn_about_setup(args: argparse.Namespace, form: PositionalForm) -> None:
    """Log a WARNING for a setup that works but is probably a mistake.

    `Proxy.serve` checks the rest: it warns about a non-loopback listen
    address and fails at startup for a missing `--pac` file.
    """
    keys = [("CA key", form.ca_key)] + [("client key", k) for k in form.client_keys]
    for role, argument in keys:
        path = key_file_path(argument)
        if path is None:
            continue
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & stat.S_IROTH and _may_hold_private_key(path):
            logger.warning(
                "Key file is readable by every user on this machine; restrict "
                "it with chmod 600 role=%s path=%s",
                role,
                path,
            )


def _read_key_head(path: Path) -> bytes | None:
    """Return the first MAX_KEY_SNIFF_BYTES of a regular file, or None for
    anything else (a FIFO would block) or an unreadable file."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as file:
            return file.read(MAX_KEY_SNIFF_BYTES)
    except OSError:
        return None


def _may_hold_private_key(path: Path) -> bool:
    """Tell whether the file at `path` may contain a private key.

    A PEM file without a PRIVATE KEY block (a certificate given as a key)
    does not: it fails later with its own error, which a warning about its
    mode would only precede. A file that is not PEM may be a DER key.
    """
    head = _read_key_head(path)
    if head is None:
        return False
    return b"-----BEGIN" not in head or b"PRIVATE KEY" in head


def _explain_missing_chain(error: BaseException, key_uri: str) -> None:
    """Re-raise a chain error on KMSURI with the `--clientcert` fix.

    The Go form reads the client chain from the key's own URI. A hardware
    store keeps both, but a key file usually does not hold the chain.
    """
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if not isinstance(error, CertificateError):
        return
    if not str(error).startswith(str(Path(key_uri).expanduser())):
        return
    raise CertificateError(
        f"{error}. KMSURI {key_uri} is read for the client certificate chain "
        "too: append the chain to that file, or add --clientcert CHAIN.pem"
    ) from error


async def serve_until_signal(
    config: ProxyConfig, on_started: Callable[[], None] | None = None
) -> ProxyAddresses | None:
    """Run `Proxy(config)` until SIGINT or SIGTERM; return its addresses.

    `on_started` is called once the proxy listens.
    """
    # "asyncio" or "uvloop": the package of the loop's class.
    loop_package = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    logger.info("Event loop name=%s", loop_package)
    proxy = Proxy(config)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as group:
            await group.start(proxy.serve)
            if on_started is not None:
                on_started()
            async for received in signals:
                logger.info("Stopping signal=%s", signal.Signals(received).name)
                group.cancel_scope.cancel()
                break
    return proxy.addresses
