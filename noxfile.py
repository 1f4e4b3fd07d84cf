"""Developer sessions: lint, tests and docs by default; demo, lock, fuzz on request.

Every session runs the tools of the locked dev environment in `.venv` (made by
`bash .ci/run`, or by hand as docs/development.md shows) instead of building
a virtualenv of its own, hence `venv_backend="none"`. A nox-built virtualenv
would install unpinned, unhashed versions. With the shared `.venv`, `nox`,
`.ci/run` and an editor see the same ruff, mypy and pytest from
requirements-dev.lock.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
VENV_BIN = ROOT / ".venv" / ("Scripts" if sys.platform == "win32" else "bin")

nox.options.default_venv_backend = "none"


def venv_tool(session: nox.Session, name: str) -> str:
    """Return the path of a tool in `.venv`, or stop the session if it is missing."""
    suffix = ".exe" if sys.platform == "win32" else ""
    path = VENV_BIN / f"{name}{suffix}"
    if not path.exists():
        session.error(
            f"{path} not found: create the dev environment with `bash .ci/run` "
            "(see docs/development.md)"
        )
    return str(path)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """Check formatting, lint rules and types (the same checks as .ci/run)."""
    session.run(venv_tool(session, "ruff"), "format", "--check", external=True)
    session.run(venv_tool(session, "ruff"), "check", external=True)
    session.run(venv_tool(session, "mypy"), external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run pytest with any extra arguments (`nox -s tests -- -k pac`)."""
    session.run(venv_tool(session, "pytest"), *session.posargs, external=True)


@nox.session(venv_backend="none", default=False)
def demo(session: nox.Session) -> None:
    """Run `kmsproxy demo`: a real mTLS upstream reached through the proxy."""
    session.run(venv_tool(session, "python"), "-m", "kmsproxy", "demo", external=True)


@nox.session(venv_backend="none", default=False)
def lock(session: nox.Session) -> None:
    """Regenerate requirements-dev.lock from requirements-dev.in with uv.

    requirements-dev.in names every workspace package as an editable, so the
    lock covers each package's runtime dependencies as well as the dev tools.
    The workspace packages themselves stay out of the lock: pip refuses an
    editable under --require-hashes, and .ci/run installs them editable.
    """
    workspace = sorted(
        path.parent.name for path in ROOT.glob("packages/*/pyproject.toml")
    )
    session.run(
        "uv",
        "pip",
        "compile",
        "--universal",
        "--python-version",
        "3.11",
        "--generate-hashes",
        *[f"--no-emit-package={name}" for name in workspace],
        "requirements-dev.in",
        "-o",
        "requirements-dev.lock",
        external=True,
    )


# Time budget of `nox -s fuzz` in seconds, unless `-- -max_total_time=N` is
# given. The default tests run the same target for a few seconds only.
FUZZ_SECONDS = 600


@nox.session(venv_backend="none", default=False)
def fuzz(session: nox.Session) -> None:
    """Run the atheris TLS and CONNECT parser fuzz target for FUZZ_SECONDS.

    Extra arguments go to libFuzzer (`nox -s fuzz -- -max_total_time=60`).
    The corpus grows in .nox/fuzz-corpus, and crashing inputs are written to
    .nox/fuzz-artifacts; copy each into packages/kmsproxy-core/fuzz/regressions
    so the default tests replay it.
    """
    corpus = ROOT / ".nox" / "fuzz-corpus"
    fuzz_directory = ROOT / "packages" / "kmsproxy-core" / "fuzz"
    inputs = [fuzz_directory / "seeds", fuzz_directory / "regressions"]
    artifacts = ROOT / ".nox" / "fuzz-artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    arguments = list(session.posargs)
    if not any(argument.startswith("-max_total_time=") for argument in arguments):
        arguments.append(f"-max_total_time={FUZZ_SECONDS}")
    session.run(
        venv_tool(session, "python"),
        str(ROOT / "packages" / "kmsproxy-core" / "fuzz" / "fuzz_tls.py"),
        f"-artifact_prefix={artifacts}/",
        *arguments,
        str(corpus),
        *[str(directory) for directory in inputs if directory.is_dir()],
        external=True,
    )


@nox.session(venv_backend="none", default=False)
def bench(session: nox.Session) -> None:
    """Benchmark kmsproxy against direct, mitmproxy and nginx on loopback.

    Also times `Signer.sign` per key source (file, swtpm, SoftHSM2, moto).
    Writes benchmarks/results.json, the results section of
    docs/benchmarks.md and docs/benchmarks.png. mitmproxy's pins conflict
    with requirements-dev.lock, so it runs from a virtualenv of its own in
    .nox/bench-mitmproxy, built from the hashed benchmarks/mitmproxy.lock
    and rebuilt when that file changes. Linux only (it reads /proc). Extra
    arguments go to benchmarks/bench.py (`nox -s bench -- --quick`, or
    `-- --only signers` for the signature latency section alone).
    """
    lock = ROOT / "benchmarks" / "mitmproxy.lock"
    venv = ROOT / ".nox" / "bench-mitmproxy"
    installed_lock = venv / "installed.lock"
    if not installed_lock.exists() or installed_lock.read_bytes() != lock.read_bytes():
        session.run(sys.executable, "-m", "venv", "--clear", str(venv), external=True)
        session.run(
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--require-hashes",
            "-r",
            str(lock),
            external=True,
        )
        installed_lock.write_bytes(lock.read_bytes())
    session.run(
        venv_tool(session, "python"),
        str(ROOT / "benchmarks" / "bench.py"),
        "--mitmdump",
        str(venv / "bin" / "mitmdump"),
        *session.posargs,
        external=True,
    )


@nox.session(venv_backend="none")
def docs(session: nox.Session) -> None:
    """Check that relative links resolve and that documented CLI flags exist."""
    kmsproxy = [venv_tool(session, "python"), "-m", "kmsproxy"]
    problems = check_links(markdown_files())
    problems += check_file_copies(markdown_files())
    try:
        commands = read_cli(kmsproxy)
    except CLIHelpError as error:
        session.error(str(error))
    problems += check_documented_commands(documented_files(), commands)
    problems += check_cli_reference(ROOT / "docs" / "cli.md", commands)
    for problem in problems:
        session.log(problem)
    if problems:
        session.error(f"{len(problems)} documentation problems")
    session.log(
        f"checked {len(markdown_files())} Markdown files and {len(commands)} commands"
    )


# The docs checker. It lives here rather than in a script of its own so that
# mypy (configured in pyproject.toml) checks it along with the sessions.

# Inline links `[text](target "title")` and reference definitions
# `[label]: target`, as CommonMark writes them.
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_INLINE_CODE = re.compile(r"`([^`]+)`")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A URL scheme such as `https:` or `mailto:`. Links with a scheme are not checked.
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# `kmsproxy` as a command word: not part of a path, a package name or a module.
_COMMAND = re.compile(r"(?:^|(?<=[\s`'\"(=/]))kmsproxy(?=[ \t])")
_OPTION = re.compile(r"^(--?[a-zA-Z0-9][a-zA-Z0-9-]*)(?:=.*)?$")
_HELP_OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z0-9][a-zA-Z0-9-]*)")
# argparse prints subcommands as `{serve,init,demo}` in its usage line.
_SUBCOMMANDS = re.compile(r"\{([a-z0-9-]+(?:,[a-z0-9-]+)*)\}")
# A subcommand's line in argparse help: four spaces, the name, its help.
_SUBCOMMAND_ENTRY = re.compile(r"^    ([a-z][a-z0-9-]*)(?:\s{2,}\S.*)?$")
_ARGUMENT_SECTIONS = frozenset(
    {"options", "optional arguments", "positional arguments"}
)
# Code block languages whose lines may run kmsproxy.
_COMMAND_LANGUAGES = frozenset(
    {"", "sh", "bash", "shell", "console", "ini", "systemd", "powershell", "bat"}
)
# Example files that a user copies and edits: systemd units, PAC files,
# kubeconfigs, launchd plists, scripts. Python examples are checked by lint.
_CONFIGURATION_SUFFIXES = frozenset(
    {".service", ".js", ".yaml", ".yml", ".plist", ".sh", ".ps1"}
)
# `<!-- file: PATH -->` before a code block: the block is a copy of PATH.
# `<!-- excerpt: PATH -->`: the block is a run of PATH's lines, indented
# differently perhaps.
_FILE_COPY = re.compile(r"^<!--\s*(file|excerpt):\s*(\S+)\s*-->\s*$")
# Words after which the next word is the command that runs.
_COMMAND_PREFIXES = frozenset(
    {"$", "sudo", "-m", "exec", "env", "time", "nohup", "then", "do", "&"}
)
_SHELL_OPENERS = ("|", "&&", ";", "(", "$(")
# Shell words that end one command and start another.
_SHELL_SEPARATORS = frozenset({"|", "||", "&&", ";", "&", "#", ">", "2>", "<"})
# Commands nest at most two levels (`kmsproxy tpm create`), so a deeper level
# would mean the help text was misread.
_MAX_COMMAND_DEPTH = 3


class CLIHelpError(Exception):
    """A `kmsproxy ... --help` call failed. The message names the command."""


@dataclass(frozen=True)
class Location:
    """A line in a file, printed as `path:line` relative to the repository."""

    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_files() -> list[Path]:
    """List README.md and every Markdown file under docs/ and examples/."""
    files = [ROOT / "README.md"]
    for folder in ("docs", "examples"):
        files += sorted((ROOT / folder).rglob("*.md"))
    return [path for path in files if path.is_file()]


def documented_files() -> list[Path]:
    """List the Markdown files and the example configuration files."""
    examples = sorted(
        path
        for path in (ROOT / "examples").rglob("*")
        if path.is_file() and path.suffix in _CONFIGURATION_SUFFIXES
    )
    return markdown_files() + examples


def iter_markdown_lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """Yield (line number, text, code language) for each line of a Markdown file.

    The code language is None outside fenced code blocks and "" inside a block
    whose fence names no language.
    """
    fence: str | None = None
    language: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if match and fence is None:
            fence = match.group(1)
            language = line.strip()[len(fence) :].strip().lower()
            continue
        if match and match.group(1) == fence:
            fence = language = None
            continue
        yield number, line, language


def heading_anchor(heading: str) -> str:
    """Return the anchor GitHub gives a heading: lowercase, punctuation dropped."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_anchors(path: Path) -> set[str]:
    """Collect the anchors of every heading in a Markdown file."""
    anchors: set[str] = set()
    for _, line, language in iter_markdown_lines(path):
        match = _HEADING.match(line)
        if match and language is None:
            anchor = heading_anchor(match.group(2))
            # GitHub numbers repeated headings: `usage`, `usage-1`, ...
            candidate, counter = anchor, 0
            while candidate in anchors:
                counter += 1
                candidate = f"{anchor}-{counter}"
            anchors.add(candidate)
    return anchors


def check_links(files: Sequence[Path]) -> list[str]:
    """Check every relative link: its file exists and its #anchor is a heading."""
    problems: list[str] = []
    for path in files:
        for number, line, language in iter_markdown_lines(path):
            if language is not None:
                continue
            prose = _INLINE_CODE.sub("", line)
            targets = _INLINE_LINK.findall(prose)
            reference = _REFERENCE_LINK.match(prose)
            if reference:
                targets.append(reference.group(1))
            for target in targets:
                problem = check_link_target(path, target)
                if problem:
                    problems.append(f"{Location(path, number)}: {problem}")
    return problems


def check_link_target(source: Path, target: str) -> str | None:
    """Return why a link from `source` to `target` is broken, or None."""
    if _URL_SCHEME.match(target):
        return None
    file_part, _, anchor = target.partition("#")
    resolved = (source.parent / file_part).resolve() if file_part else source
    if not resolved.is_relative_to(ROOT):
        return f"link {target!r} leaves the repository"
    if not resolved.exists():
        return f"link {target!r}: {resolved.relative_to(ROOT)} does not exist"
    if anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
        return f"link {target!r}: no heading with anchor #{anchor}"
    return None


def check_file_copies(files: Sequence[Path]) -> list[str]:
    """Check each code block marked as a copy or an excerpt of a file.

    Docs show some example files in full and quote some tests. The marks
    keep those copies from drifting away from the files that lint and
    tests check.
    """
    problems: list[str] = []
    for path in files:
        mark: re.Match[str] | None = None
        mark_line = 0
        block: list[str] | None = None
        for number, line, language in iter_markdown_lines(path):
            new_mark = _FILE_COPY.match(line) if language is None else None
            if new_mark:
                mark, mark_line = new_mark, number
            elif mark is not None and language is not None:
                block = (block or []) + [line]
            elif mark is not None and (block is not None or line.strip()):
                problems += compare_copy(Location(path, mark_line), mark, block)
                mark, block = None, None
        if mark is not None:
            problems += compare_copy(Location(path, mark_line), mark, block)
    return problems


def compare_copy(
    location: Location, mark: re.Match[str], block: list[str] | None
) -> list[str]:
    """Return a problem if a marked code block differs from its original file."""
    kind, target = mark.groups()
    original = (location.path.parent / target).resolve()
    if not original.is_file():
        return [f"{location}: {target} does not exist"]
    if block is None:
        return [f"{location}: no code block follows the {kind} mark"]
    name = original.relative_to(ROOT)
    expected = original.read_text(encoding="utf-8").rstrip("\n").splitlines()
    if kind == "excerpt":
        if contains_run(
            [line.strip() for line in expected], [b.strip() for b in block]
        ):
            return []
        return [f"{location}: the excerpt is not a run of lines of {name}"]
    if block == expected:
        return []
    for index, (copied, actual) in enumerate(zip(block, expected, strict=False)):
        if copied != actual:
            return [f"{location}: the copy of {name} differs at line {index + 1}"]
    return [
        f"{location}: the copy of {name} has {len(block)} lines, "
        f"the file {len(expected)}"
    ]


def contains_run(lines: Sequence[str], run: Sequence[str]) -> bool:
    """Tell whether `run` occurs in `lines` as consecutive lines."""
    return any(
        list(lines[start : start + len(run)]) == list(run)
        for start in range(len(lines) - len(run) + 1)
    )


def read_cli(kmsproxy: Sequence[str]) -> dict[tuple[str, ...], set[str]]:
    """Map each command path (`()`, `("serve",)`, ...) to the options it accepts.

    Reads the real `--help` output, so the result follows the installed CLI and
    any backend commands it has.
    """
    commands: dict[tuple[str, ...], set[str]] = {}
    pending: list[tuple[str, ...]] = [()]
    while pending:
        command = pending.pop()
        text = cli_help([*kmsproxy, *command, "--help"])
        commands[command] = set(_HELP_OPTION.findall(options_part(text)))
        if len(command) + 1 < _MAX_COMMAND_DEPTH:
            pending += [(*command, name) for name in help_subcommands(text)]
    return commands


def help_subcommands(help_text: str) -> list[str]:
    """Return the subcommand names that an argparse help text lists.

    argparse shows them as `{serve,init}` when the subparsers have no
    metavar. With a metavar, they are the lines indented by four spaces in
    a section other than the option and positional argument lists.
    """
    choices = _SUBCOMMANDS.search(help_text.split("\n\n", 1)[0])
    if choices:
        return choices.group(1).split(",")
    names: list[str] = []
    section = ""
    for line in help_text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            section = line[:-1]
            continue
        entry = _SUBCOMMAND_ENTRY.match(line)
        if entry and section not in _ARGUMENT_SECTIONS:
            names.append(entry.group(1))
    return names


def cli_help(argv: Sequence[str]) -> str:
    """Return the output of one `--help` call, raising CLIHelpError if it fails."""
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        command_line = " ".join(["kmsproxy", *argv[3:]])
        raise CLIHelpError(
            f"`{command_line}` failed with status {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


def options_part(help_text: str) -> str:
    """Return the option descriptions of a help text, without its usage line.

    The usage line also names options, but in a wrapped, bracketed form that
    adds nothing the option list lacks.
    """
    _, _, rest = help_text.partition("\n\n")
    return rest


def check_documented_commands(
    files: Sequence[Path], commands: dict[tuple[str, ...], set[str]]
) -> list[str]:
    """Check that each `kmsproxy ...` command line in the docs is a real command."""
    problems: list[str] = []
    for path in files:
        for number, text in command_texts(path):
            for match in _COMMAND.finditer(text):
                if not at_command_position(text, match.start()):
                    continue
                words = shell_words(text[match.end() :])
                problem = check_command_words(words, commands)
                if problem:
                    problems.append(f"{Location(path, number)}: {problem}")
    return problems


def command_texts(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for every piece of a file that may contain commands.

    In Markdown these are inline code and shell or unit-file code blocks,
    because prose and program output use "kmsproxy" as a name. In example
    files they are all lines except comments. Lines that end in a backslash
    are joined with the next, as a shell would.
    """
    lines: list[tuple[int, str]] = []
    if path.suffix == ".md":
        for number, line, language in iter_markdown_lines(path):
            if language is None:
                lines += [(number, span) for span in _INLINE_CODE.findall(line)]
            elif language in _COMMAND_LANGUAGES:
                lines.append((number, line))
    else:
        text = path.read_text(encoding="utf-8")
        lines = [
            (number, line)
            for number, line in enumerate(text.splitlines(), 1)
            if not line.lstrip().startswith(("#", "//", ";"))
        ]
    start, joined = 0, ""
    for number, line in lines:
        if not joined:
            start = number
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        yield start, joined + line
        joined = ""
    if joined:
        yield start, joined


def at_command_position(text: str, start: int) -> bool:
    """Tell whether the word `kmsproxy` at `start` is the command that runs.

    It is when nothing but a prompt, `sudo`, `python3 -m`, a shell separator
    or a variable assignment comes before it, and not when it is an argument
    of another command, as in `journalctl --user -u kmsproxy -f`.
    """
    word_start = max(text.rfind(" ", 0, start), text.rfind("\t", 0, start)) + 1
    before = text[:word_start].split()
    if not before:
        return True
    previous = before[-1].strip("`")
    if previous in _COMMAND_PREFIXES or previous.endswith(_SHELL_OPENERS):
        return True
    return "=" in previous and not previous.startswith("-")


def shell_words(text: str) -> list[str]:
    """Split a command line into words, stopping at the end of this command."""
    words: list[str] = []
    for word in text.split():
        if word in _SHELL_SEPARATORS or word.startswith("#"):
            break
        words.append(word.strip("`'\""))
    return words


def subcommands(
    command: tuple[str, ...], commands: dict[tuple[str, ...], set[str]]
) -> set[str]:
    """Return the names of the subcommands directly under `command`."""
    return {
        key[-1]
        for key in commands
        if len(key) == len(command) + 1 and key[:-1] == command
    }


def check_command_words(
    words: Sequence[str], commands: dict[tuple[str, ...], set[str]]
) -> str | None:
    """Return why `kmsproxy WORDS` is not a valid command line, or None."""
    command: tuple[str, ...] = ()
    for word in words:
        children = subcommands(command, commands)
        if word in children:
            command = (*command, word)
            continue
        if children and re.fullmatch(r"[a-z][a-z0-9-]*", word):
            command_line = " ".join(["kmsproxy", *command, word])
            known = ", ".join(sorted(children))
            return f"`{command_line}`: no such command (known: {known})"
        break
    command_line = " ".join(["kmsproxy", *command])
    unknown = [
        match.group(1)
        for match in map(_OPTION.match, words)
        if match and match.group(1) not in commands[command]
    ]
    if unknown:
        return f"`{command_line}` has no option {', '.join(unknown)}"
    return None


def check_cli_reference(
    reference: Path, commands: dict[tuple[str, ...], set[str]]
) -> list[str]:
    """Check that docs/cli.md has a section per command naming all its options.

    A section starts at a heading that contains `kmsproxy COMMAND` and ends at
    the next heading of the same or a higher level.
    """
    if not reference.is_file():
        return [f"{reference.relative_to(ROOT)} does not exist"]
    sections: dict[tuple[str, ...], list[str]] = {}
    current: tuple[str, ...] | None = None
    current_level = 0
    for _, line, language in iter_markdown_lines(reference):
        heading = None if language is not None else _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            command = heading_command(heading.group(2), commands)
            if command is not None:
                current, current_level = command, level
                sections[command] = []
                continue
            if current is not None and level <= current_level:
                current = None
        if current is not None:
            sections[current].append(line)
    problems = []
    for command, options in sorted(commands.items()):
        command_line = " ".join(["kmsproxy", *command])
        if command not in sections:
            problems.append(
                f"{reference.relative_to(ROOT)}: no section `{command_line}`"
            )
            continue
        text = "\n".join(sections[command])
        missing = sorted(
            option
            for option in options - {"-h", "--help"}
            if option.startswith("--")
            and not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)
        )
        if missing:
            problems.append(
                f"{reference.relative_to(ROOT)}: section `{command_line}` does not "
                f"describe {', '.join(missing)}"
            )
    return problems


def heading_command(
    heading: str, commands: dict[tuple[str, ...], set[str]]
) -> tuple[str, ...] | None:
    """Return the command a heading such as "`kmsproxy serve`" documents, or None."""
    match = re.search(r"`kmsproxy((?:\s+[a-z][a-z0-9-]*)*)[^`]*`", heading)
    if match is None:
        return None
    command = tuple(match.group(1).split())
    return command if command in commands else None
