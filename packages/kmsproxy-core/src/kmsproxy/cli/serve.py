"""`kmsproxy serve`: run the proxy until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

import anyio

from kmsproxy.config import DEFAULT_LISTEN, DEFAULT_PAC_LISTEN, ProxyConfig
from kmsproxy.errors import UserError
from kmsproxy.proxy import Proxy, ProxyAddresses

logger = logging.getLogger(__name__)

CA_KEY_NAME = "ca.key"
CA_CERTIFICATE_NAME = "ca.crt"


def config_directory() -> Path:
    """Return `$XDG_CONFIG_HOME/kmsproxy`, by default `~/.config/kmsproxy`."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kmsproxy"


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "serve",
        help="run the proxy",
        description=(
            "Listen for HTTP CONNECT (plain or TLS) and open each tunnel with "
            "the client certificate. CAKEY and CACERT default to ca.key and "
            f"ca.crt in {config_directory()} (see `kmsproxy init`)."
        ),
    )
    add_serve_arguments(parser)
    parser.set_defaults(handler=run)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ca_key", nargs="?", metavar="CAKEY", help="CA key path or URI")
    parser.add_argument(
        "ca_certificate", nargs="?", metavar="CACERT", help="CA certificate path"
    )
    parser.add_argument(
        "--clientkey",
        action="append",
        required=True,
        metavar="KEY",
        help="client key path or URI (repeat for several identities)",
    )
    parser.add_argument(
        "--clientcert",
        action="append",
        required=True,
        metavar="CERT",
        help="client certificate chain path or URI (repeat; paired by key)",
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
        f"(default {DEFAULT_LISTEN})",
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


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """Build the `ProxyConfig` that `serve` (and the demo) runs."""
    if (args.ca_key is None) != (args.ca_certificate is None):
        raise UserError("give both CAKEY and CACERT, or neither to use the defaults")
    if args.ca_key is None:
        directory = config_directory()
        ca_key = directory / CA_KEY_NAME
        ca_certificate = directory / CA_CERTIFICATE_NAME
        if not ca_key.exists() or not ca_certificate.exists():
            raise UserError(
                f"no local CA in {directory}: run `kmsproxy init` first, "
                "or pass CAKEY and CACERT"
            )
    else:
        ca_key, ca_certificate = args.ca_key, args.ca_certificate
    if args.pac_listen is not None and args.pac_port is not None:
        raise UserError("give --pac-listen or --pac-port, not both")
    pac_listen = args.pac_listen or DEFAULT_PAC_LISTEN
    if args.pac_port is not None:
        pac_listen = f"localhost:{args.pac_port}"
    return ProxyConfig(
        ca_key=ca_key,
        ca_certificate=ca_certificate,
        client_keys=list(args.clientkey),
        client_certificates=list(args.clientcert),
        trust=list(args.trust),
        listen=args.listen,
        pac_listen=pac_listen,
        pac_file=args.pac,
        insecure_skip_verify=args.insecure_skip_verify,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    anyio.run(serve_until_signal, config)
    return 0


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
