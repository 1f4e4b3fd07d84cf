"""`kmsproxy serve`: run the proxy until SIGINT or SIGTERM.

Two positional forms are accepted. Ours is `[CAKEY CACERT]` with the client
identities in `--clientkey` and `--clientcert`. The Go tool
step-kmsproxy-plugin's is `KMSURI CERT KEY`: one client key URI, whose
certificate chain is read from the same URI, then the local CA's certificate
and key. The count of positional arguments selects the form.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from kmsproxy.certificates import CertificateError
from kmsproxy.config import DEFAULT_LISTEN, DEFAULT_PAC_LISTEN, ProxyConfig
from kmsproxy.errors import UserError
from kmsproxy.proxy import Proxy, ProxyAddresses

logger = logging.getLogger(__name__)

CA_KEY_NAME = "ca.key"
CA_CERTIFICATE_NAME = "ca.crt"

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
            "the client certificate. CAKEY and CACERT default to ca.key and "
            f"ca.crt in {config_directory()} (see `kmsproxy init`). Three "
            "positionals are step-kmsproxy-plugin's form: the client key URI, "
            "whose certificate chain is read from the same URI, then the CA "
            "certificate and the CA key."
        ),
    )
    add_serve_arguments(parser)
    parser.set_defaults(handler=run)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # NOTE: argparse (Python 3.11) reads the positionals only as one run, so
    # `KMSURI --cacert F CERT KEY`, which the Go tool's parser accepts, fails
    # with "unrecognized arguments: CERT KEY".
    parser.add_argument(
        "positionals",
        nargs="*",
        metavar="ARG",
        help=(
            "CAKEY CACERT: the local CA's key (path or URI) and certificate; "
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
        type=int,
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
    parser.add_argument("--verbose", "-v", action="store_true", help="log at DEBUG")


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
    if positionals:
        ca_key: str | Path = positionals[0]
        ca_certificate: str | Path = positionals[1]
    else:
        ca_key, ca_certificate = default_ca_paths()
    return PositionalForm(
        name=FORM_KMSPROXY,
        ca_key=ca_key,
        ca_certificate=ca_certificate,
        client_keys=client_keys,
        client_certificates=client_certificates,
    )


def default_ca_paths() -> tuple[Path, Path]:
    """Return the CA key and certificate that `kmsproxy init` wrote."""
    directory = config_directory()
    ca_key = directory / CA_KEY_NAME
    ca_certificate = directory / CA_CERTIFICATE_NAME
    if not ca_key.exists() or not ca_certificate.exists():
        raise UserError(
            f"no local CA in {directory}: run `kmsproxy init` first, "
            "or pass CAKEY and CACERT"
        )
    return ca_key, ca_certificate


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
    )


def run(args: argparse.Namespace) -> int:
    form = read_positional_form(args)
    config = config_from_form(args, form)
    try:
        anyio.run(serve_until_signal, config)
    except Exception as error:
        if form.chain_from_key_uri is not None:
            _explain_missing_chain(error, form.chain_from_key_uri)
        raise
    return 0


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


async def serve_until_signal(config: ProxyConfig) -> ProxyAddresses | None:
    """Run `Proxy(config)` until SIGINT or SIGTERM; return its addresses."""
    proxy = Proxy(config)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as group:
            await group.start(proxy.serve)
            async for received in signals:
                logger.info("Stopping signal=%s", signal.Signals(received).name)
                group.cancel_scope.cancel()
                break
    return proxy.addresses
