"""The `kmsproxy` command line: one module per command.

`main` builds the parser (backends add their commands through the
`kmsproxy_add_commands` hook), runs the chosen command, and turns user
errors into one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import NoReturn

import kmsproxy
from kmsproxy.certificates import CertificateError
from kmsproxy.cli import backends, csr, demo, init, serve
from kmsproxy.errors import UserError
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import SignerError
from kmsproxy.uri import URIError

USER_ERRORS = (UserError, URIError, CertificateError, SignerError)

# Exit status for a user error, as argparse uses for usage errors.
EXIT_USER_ERROR = 2

# Exit status after SIGINT, by the shell convention 128 + signal number.
EXIT_INTERRUPTED = 130

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser(registry: Registry | None) -> argparse.ArgumentParser:
    """Build the parser with every built-in and backend command."""
    parser = argparse.ArgumentParser(
        prog="kmsproxy",
        description=(
            "A local HTTPS proxy that authenticates to servers with a client "
            "certificate whose key stays in hardware."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"kmsproxy {kmsproxy.__version__}"
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    serve.add_parser(subparsers)
    init.add_parser(subparsers)
    csr.add_parser(subparsers)
    backends.add_parser(subparsers)
    demo.add_parser(subparsers)
    if registry is not None:
        add_backend_commands(registry, subparsers)
    return parser


def add_backend_commands(
    registry: Registry,
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> None:
    """Call each backend's `kmsproxy_add_commands`, one backend at a time.

    A single hook call would stop at the first backend that raises and take
    every command down with it. A backend that raises is logged, and its
    commands may be missing or incomplete.
    """
    hook = registry.plugin_manager.hook.kmsproxy_add_commands
    for implementation in hook.get_hookimpls():
        try:
            implementation.function(subparsers=subparsers)
        except Exception as error:
            # Any exception, because a plugin's hook may run arbitrary code.
            logger.warning(
                "Backend commands not added backend=%s error=%s: %s",
                implementation.plugin_name,
                type(error).__name__,
                error,
            )


# Libraries whose DEBUG output stays off under --verbose. watchfiles logs
# every filtered file event, so a log file written next to a watched
# certificate would feed itself. botocore (1.44) logs every request header at
# DEBUG, including X-Amz-Security-Token and Authorization, and urllib3 logs
# each connection it opens below it: neither may reach a log that users paste.
QUIET_LOGGERS = ("watchfiles", "asyncio", "botocore", "boto3", "urllib3")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `kmsproxy` command and return its exit status."""
    try:
        # Logging is configured before the registry loads, so a backend that
        # fails to load is logged in the usual format. --verbose is known
        # only after parsing. A program that configured logging keeps its own.
        configured_here = not logging.getLogger().handlers
        configure_logging(verbose=False)
        registry = Registry.load()
        parser = build_parser(registry)
        args = parser.parse_args(argv)
        if not hasattr(args, "handler"):
            parser.print_help(sys.stderr)
            return EXIT_USER_ERROR
        if configured_here and getattr(args, "verbose", False):
            logging.getLogger().setLevel(logging.DEBUG)
        status: int = args.handler(args)
        return status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as error:
        user_error = _single_user_error(error)
        if user_error is None:
            raise
        print(f"kmsproxy: error: {user_error}", file=sys.stderr)
        return EXIT_USER_ERROR


# How long idle worker threads get to exit after the event loop has stopped.
# anyio stops each idle worker when the loop ends, which takes milliseconds.
# A worker still alive after this runs an abandoned call.
WORKER_EXIT_SECONDS = 1.0


def run() -> NoReturn:
    """Run `main` as the `kmsproxy` program and exit with its status.

    A device call abandoned after a timeout (see `BlockingSigner`) keeps its
    worker thread, and Python waits for every such thread before it exits.
    A hung TPM would then keep `kmsproxy` alive after SIGTERM or after a
    timeout error. So when a worker is still busy, the program logs it and
    exits without waiting, also after an unexpected exception (whose
    traceback it prints first). `os._exit` skips atexit handlers and library
    finalizers (PKCS#11 `C_Finalize`, ESYS), which is right while a call is
    hung inside them. Logs and output are flushed first.
    """
    try:
        status = main()
    except SystemExit as exit_request:
        status = _exit_status(exit_request)
    except BaseException:
        traceback.print_exc()
        status = 1
    workers = [
        thread
        for thread in threading.enumerate()
        if not thread.daemon and thread is not threading.main_thread()
    ]
    deadline = time.monotonic() + WORKER_EXIT_SECONDS
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
    busy = [worker for worker in workers if worker.is_alive()]
    if not busy:
        sys.exit(status)
    logger.warning(
        "Exiting without waiting for device calls that did not return calls=%d",
        len(busy),
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _exit_status(exit_request: SystemExit) -> int:
    """Return the process status that `sys.exit(code)` would give."""
    code = exit_request.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _single_user_error(error: BaseException) -> BaseException | None:
    """Return the user error inside `error`, unwrapping task-group groups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, USER_ERRORS) else None
