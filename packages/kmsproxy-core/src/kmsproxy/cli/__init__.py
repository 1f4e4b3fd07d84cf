"""The `kmsproxy` command line: one module per command.

`main` builds the parser (backends add their commands through the
`kmsproxy_add_commands` hook), runs the chosen command, and turns user
errors into one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
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
from kmsproxy.uri import URIError, redact_text

USER_ERRORS = (UserError, URIError, CertificateError, SignerError)

# Exit status for a user error, as argparse uses for usage errors.
EXIT_USER_ERROR = 2

# Minimum difflib similarity ratio for "did you mean" on an option name,
# compared without its dashes. Typos score above it (`clientcrt` against
# `clientcert` 0.95, `forc` against `force` 0.89), and an unrelated name
# such as `bogus` matches no option of `serve`.
OPTION_SUGGESTION_CUTOFF = 0.75

# Exit status after SIGINT, by the shell convention 128 + signal number.
EXIT_INTERRUPTED = 130

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CommandLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, as other errors are.

    Subcommand parsers, backends' included, are made with the class of the
    top-level parser, so they get the same `error`.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USER_ERROR,
            f"{self.prog}: error: {message} (see `{self.prog} --help`)\n",
        )


def build_parser(registry: Registry | None) -> argparse.ArgumentParser:
    """Build the parser with every built-in and backend command."""
    parser = CommandLineParser(
        prog="kmsproxy",
        allow_abbrev=False,
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
    _record_command_parsers(parser)
    return parser


def _record_command_parsers(parser: argparse.ArgumentParser) -> None:
    """Store each (sub)command's parser in its namespace as `command_parser`,
    and turn off abbreviated options in each.

    `parse_command_line` reports an unknown option under the name of the
    command it was given to, instead of the top-level `kmsproxy`. argparse would
    otherwise take a prefix such as `--ins` for `--insecure-skip-verify`,
    so a typo could turn off upstream verification or make `init` replace
    the CA (`--forc`). Backends add their commands through a hook, so this
    covers their parsers too.
    """
    # argparse has no public way to list a parser's subcommands, so this
    # reads its private `_actions` and `_SubParsersAction`.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command_parser in action.choices.values():
                command_parser.allow_abbrev = False
                command_parser.set_defaults(command_parser=command_parser)
                _record_command_parsers(command_parser)


def parse_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse `argv`, taking positionals between options as the Go tool does.

    argparse reads a command's positional arguments as one run, so in
    `serve KMSURI --cacert F CERT KEY` the last two are left over. Left-over
    words that are not options join the `positionals` of a command that
    has them. A left-over option is an error that names the closest known
    option of that command.
    """
    args, extras = parser.parse_known_args(argv)
    command_parser: argparse.ArgumentParser = getattr(args, "command_parser", parser)
    positionals = getattr(args, "positionals", None)
    if not extras:
        return args
    if isinstance(positionals, list) and not any(e.startswith("-") for e in extras):
        positionals.extend(extras)
        return args
    command_parser.error(describe_unrecognized(command_parser, extras))


def describe_unrecognized(
    parser: argparse.ArgumentParser, extras: Sequence[str]
) -> str:
    """Name the arguments `parser` does not know, with a close option name."""
    message = f"unrecognized arguments: {' '.join(_redacted_arguments(extras))}"
    # Names compare without their dashes, which would make any two long
    # options look alike to difflib.
    known = {
        option.lstrip("-"): option
        for action in parser._actions
        for option in action.option_strings
    }
    for extra in extras:
        if not extra.startswith("-"):
            continue
        name = extra.partition("=")[0].lstrip("-")
        # A prefix of one option names it (abbreviations are not accepted),
        # otherwise the closest spelling does.
        close = [option for option in known if option.startswith(name)]
        if len(close) != 1:
            close = difflib.get_close_matches(
                name, known, n=1, cutoff=OPTION_SUGGESTION_CUTOFF
            )
        if close:
            return f"{message}; did you mean {known[close[0]]}?"
    return message


def _redacted_arguments(extras: Sequence[str]) -> list[str]:
    """Return `extras` fit for an error message: option names as typed,
    values hidden.

    A left-over argument may be a PIN (`--pin 1234`, a misspelt
    `--key 'pkcs11:...?pin-value=...'`), so an option's `=VALUE` and a word
    after an option become `***`, and other words go through `redact_text`.
    """
    redacted = []
    after_option = False
    for extra in extras:
        if extra.startswith("-"):
            name, equals, _ = extra.partition("=")
            redacted.append(f"{name}=***" if equals else name)
            after_option = True
        else:
            redacted.append("***" if after_option else redact_text(extra))
            after_option = False
    return redacted


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
        args = parse_command_line(parser, argv)
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
