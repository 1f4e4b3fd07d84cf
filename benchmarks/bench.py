"""Measure kmsproxy against going direct, mitmproxy and an nginx terminator.

Run by `nox -s bench`, which builds mitmproxy's own virtualenv first and
passes `--mitmdump`. Everything listens on 127.0.0.1 (and the upstream also
on ::1), and every process is stopped by its PID when the run ends.

    python benchmarks/bench.py --mitmdump .nox/bench-mitmproxy/bin/mitmdump

The run writes benchmarks/results.json, then `report.py` turns it into the
results section of docs/benchmarks.md and docs/benchmarks.png. The signer
latency section (`signers.py`) runs after the contenders; `--only signers`
runs it alone and replaces only its part of an existing results.json. The
TLS client handshake section (`handshake.py`) follows, and `--only
handshake` works the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import clients
import cputime
import handshake
import keysources
import report
import servers
import signers
from clients import Route
from keysources import KeySetup
from servers import Keys, Process, Upstream

ROOT = servers.ROOT
RESULTS = ROOT / "benchmarks" / "results.json"

# The sizes the benchmark specification sets. `--quick` divides them for
# a trial run of the harness itself; its figures are not comparable.
BULK_MIB = 1024
FRESH_REQUESTS = 500
CONCURRENT_CLIENTS = 50
CONCURRENT_SECONDS = 30.0
SIGNER_CONNECTIONS = 1000
IDLE_TUNNELS = 1000

# Repetitions of each timed measurement. Three gives a median with a min
# and a max, and keeps `nox -s bench` near 20 minutes on 2 cores. The
# signer count and the idle RSS are measured once: the first is a count,
# and the second varies by a few percent between runs.
REPEAT = 3

# The `--only` name of the signer latency section.
SIGNERS = "signers"

# The `--only` name of the TLS client handshake section.
HANDSHAKE = "handshake"

# The sections that `--only` can run alone, keeping the contenders' figures.
SECTIONS = {SIGNERS, HANDSHAKE}

# Open files this process and its children may need: 1,000 idle tunnels
# take two descriptors each in a proxy and one each here.
REQUIRED_OPEN_FILES = 8192


@dataclass(frozen=True)
class KeySource:
    """The location of kmsproxy's client key for one row of the results."""

    name: str
    label: str
    setup: Callable[[Keys, Path], KeySetup]


KEY_SOURCES = {
    "file": KeySource("file", "kmsproxy, file key", keysources.file_key),
    "swtpm": KeySource("swtpm", "kmsproxy, key in swtpm", keysources.swtpm_key),
    "softhsm2": KeySource(
        "softhsm2", "kmsproxy, key in SoftHSM2", keysources.softhsm2_key
    ),
}


@dataclass
class Contender:
    """One path from client to upstream: its routes and how to start it."""

    name: str
    label: str
    routes: dict[str, Route]
    # Starts the process in front of the upstream; None for the direct path.
    start: Callable[[], Process] | None = None
    proxy_process: Process | None = None


@dataclass
class Row:
    """The measurements of one contender, each a list over repetitions."""

    name: str
    label: str
    status: str = "measured"
    note: str = ""
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)


@dataclass(frozen=True)
class Sizes:
    bulk_mib: int
    fresh_requests: int
    concurrent_clients: int
    concurrent_seconds: float
    signer_connections: int
    idle_tunnels: int
    repeat: int


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values`."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def measure(contender: Contender, row: Row, upstream: Upstream, sizes: Sizes) -> None:
    """Run every measurement on one contender, whose process is running."""
    resumed = contender.routes["resumed"]
    full = contender.routes["full"]
    blob = upstream_blob(upstream)
    for attempt in range(sizes.repeat):
        log(f"{row.name}: bulk transfers, round {attempt + 1}")
        measure_transfer(
            row, "download", lambda: clients.curl_download(resumed, "/big"), contender
        )
        measure_transfer(
            row, "upload", lambda: clients.curl_upload(resumed, blob), contender
        )
    for attempt in range(sizes.repeat):
        log(f"{row.name}: fresh connections, round {attempt + 1}")
        for mode, route in (("resumed", resumed), ("full", full)):
            sample = clients.fresh_latencies(
                route, sizes.fresh_requests, resume=mode == "resumed"
            )
            row.add(f"latency_p50_ms_{mode}", 1000 * percentile(sample.seconds, 0.5))
            row.add(f"latency_p99_ms_{mode}", 1000 * percentile(sample.seconds, 0.99))
    for attempt in range(sizes.repeat):
        log(f"{row.name}: {sizes.concurrent_clients} clients, round {attempt + 1}")
        row.add(
            "requests_per_second",
            clients.requests_per_second(
                resumed, sizes.concurrent_clients, sizes.concurrent_seconds
            ),
        )
    log(f"{row.name}: signer calls over {sizes.signer_connections} connections")
    before, _ = upstream.handshake_counts("counted")
    clients.fresh_latencies(
        contender.routes["counted"], sizes.signer_connections, resume=True
    )
    time.sleep(0.5)  # The access log is flushed every 100 ms.
    after, _ = upstream.handshake_counts("counted")
    row.add("signer_calls_per_1000", (after - before) * 1000 / sizes.signer_connections)
    if contender.proxy_process is not None:
        log(f"{row.name}: RSS with {sizes.idle_tunnels} idle tunnels")
        process = contender.proxy_process
        baseline = process.rss_bytes()
        sockets = clients.open_idle_tunnels(resumed, sizes.idle_tunnels)
        try:
            time.sleep(1.0)
            loaded = process.rss_bytes()
        finally:
            clients.close_all(sockets)
        row.add("idle_rss_mib", loaded / 2**20)
        row.add("rss_per_tunnel_kib", (loaded - baseline) / sizes.idle_tunnels / 1024)


def measure_transfer(
    row: Row,
    direction: str,
    transfer: Callable[[], clients.Transfer],
    contender: Contender,
) -> None:
    """Run one bulk transfer and add its MB/s and the proxy's CPU per MB.

    The CPU figure is the user plus system time of the proxy's process
    tree while curl ran, in ms per MB of body. It also covers the proxy's
    share of curl's CONNECT and TLS handshakes, which smaller `--bulk-mib`
    sizes make weigh more. The direct path has no process in between and
    gets no CPU figure.
    """
    process = contender.proxy_process
    before = cputime.tree_cpu_seconds(process.pid) if process else 0.0
    result = transfer()
    row.add(f"{direction}_mbps", result.mbps)
    if process is not None:
        used = cputime.tree_cpu_seconds(process.pid) - before
        row.add(f"{direction}_cpu_ms_per_mb", 1000 * used / result.megabytes)


def upstream_blob(upstream: Upstream) -> Path:
    return upstream.directory / "content" / "big"


def measure_startup(contender: Contender, row: Row, sizes: Sizes) -> None:
    """Time start to first proxied response; leave the last start running."""
    if contender.start is None:
        return
    for attempt in range(sizes.repeat):
        log(f"{row.name}: start to first response, round {attempt + 1}")
        seconds, process = clients.first_response_seconds(
            contender.start, contender.routes["resumed"]
        )
        row.add("startup_seconds", seconds)
        if attempt + 1 < sizes.repeat:
            process.stop()
        else:
            contender.proxy_process = process


def build_contenders(
    args: argparse.Namespace,
    work: Path,
    keys: Keys,
    upstream: Upstream,
    processes: list[Process],
    stops: list[Callable[[], None]],
    rows: list[Row],
) -> Iterator[Contender]:
    """Yield each contender to measure; rows that cannot run get a note."""
    listeners = servers.UPSTREAM_LISTENERS

    yield Contender(
        "direct",
        "direct, file key (ceiling)",
        {
            name: Route(
                "direct",
                upstream.ports[name],
                keys.upstream_ca,
                client_cert=(keys.client_cert, keys.client_key),
            )
            for name in listeners
        },
    )

    python = ROOT / ".venv" / "bin" / "python"
    for source_name in args.key_sources:
        source = KEY_SOURCES[source_name]
        name = f"kmsproxy-{source.name}"
        if args.only and not any(only.startswith(name) for only in args.only):
            continue
        try:
            key_setup = source.setup(keys, work)
        except Exception as error:
            # A broken key store costs one row, not the whole run.
            note = f"setting up the key failed: {type(error).__name__}: {error}"
            rows.append(Row(name, source.label, status="failed", note=note))
            continue
        if key_setup.stop is not None:
            stops.append(key_setup.stop)
        key_argument, cert_argument = key_setup.key_argument, key_setup.cert_argument
        port = servers.free_port()
        argv = servers.kmsproxy_argv(python, keys, port, key_argument, cert_argument)
        if args.profile:
            argv = [
                str(ROOT / ".venv" / "bin" / "pyinstrument"),
                "-r",
                "text",
                "-o",
                str(args.profile),
                *argv[1:],
            ]
        yield Contender(
            name,
            source.label,
            {
                listener: Route(
                    name, upstream.ports[listener], keys.proxy_ca_cert, port
                )
                for listener in listeners
            },
            start=_starter(name, argv, work, port, processes),
        )
        if args.compare_loops and source.name == "file":
            # The same proxy on uvloop instead of the standard asyncio loop,
            # so each run shows the difference.
            port = servers.free_port()
            argv = servers.kmsproxy_argv(
                python, keys, port, key_argument, cert_argument
            )
            argv += ["--event-loop", "uvloop"]
            name = "kmsproxy-file-uvloop"
            yield Contender(
                name,
                "kmsproxy, file key, on uvloop",
                {
                    listener: Route(
                        name, upstream.ports[listener], keys.proxy_ca_cert, port
                    )
                    for listener in listeners
                },
                start=_starter(name, argv, work, port, processes),
            )

    mitmdump = args.mitmdump
    if mitmdump is None or not Path(mitmdump).exists():
        rows.append(
            Row(
                "mitmproxy",
                "mitmproxy, file key",
                status="skipped",
                note="no mitmdump given (`nox -s bench` builds one)",
            )
        )
    else:
        port = servers.free_port()
        confdir = work / "mitmproxy"
        confdir.mkdir()
        argv = servers.mitmproxy_argv(Path(mitmdump), keys, port, confdir)
        yield Contender(
            "mitmproxy",
            "mitmproxy, file key",
            {
                listener: Route(
                    "mitmproxy",
                    upstream.ports[listener],
                    servers.mitmproxy_ca(confdir),
                    port,
                )
                for listener in listeners
            },
            start=_starter("mitmproxy", argv, work, port, processes),
        )

    terminator_directory = work / "terminator"
    terminator_directory.mkdir()
    process, ports = servers.start_terminator(terminator_directory, keys, upstream)
    processes.append(process)
    yield Contender(
        "nginx",
        "nginx terminator, file key",
        {
            listener: Route("nginx", ports[listener], keys.upstream_ca)
            for listener in listeners
        },
        proxy_process=process,
    )


def _starter(
    name: str, argv: list[str], work: Path, port: int, processes: list[Process]
) -> Callable[[], Process]:
    def start() -> Process:
        process = servers.spawn(name, argv, work)
        processes.append(process)
        return process

    return start


def machine() -> dict[str, str]:
    """Describe the machine and the software versions of this run."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, check=False
            )
            text = (result.stdout or result.stderr).strip()
            return text.splitlines()[0] if text else "unknown"
        return "unknown"

    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cores": str(len(_cpus())),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kmsproxy commit": commit,
        "nginx": version([servers.require("nginx"), "-v"]).split("/")[-1],
        "curl": version(["curl", "--version"]).split()[1],
        "openssl": version(["openssl", "version"]).split()[1],
    }


def _cpus() -> set[int]:
    return os.sched_getaffinity(0)


def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, REQUIRED_OPEN_FILES))
    if wanted < REQUIRED_OPEN_FILES:
        raise SystemExit(
            f"the open-file limit is {hard}, but {REQUIRED_OPEN_FILES} are needed "
            "for the idle tunnels (raise it with `ulimit -n`)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mitmdump", help="mitmdump to run (from nox -s bench)")
    parser.add_argument(
        "--key-sources",
        nargs="+",
        choices=sorted(KEY_SOURCES),
        default=["file", "swtpm", "softhsm2"],
        help="where kmsproxy's client key lives, one row each",
    )
    parser.add_argument(
        "--compare-loops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add a row for kmsproxy with a file key on uvloop (default: on)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="shrink the sizes (transfers to 1/16, counts and durations to 1/10) "
        "and run one round, to try the harness",
    )
    parser.add_argument(
        "--bulk-mib", type=int, help="override the bulk transfer size, in MiB"
    )
    parser.add_argument(
        "--repeat", type=int, help="override the rounds of each timed measurement"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        help="measure only these contenders (direct is always measured); "
        f"`{SIGNERS}` names the signer latency section and `{HANDSHAKE}` the "
        "TLS client handshake section",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run kmsproxy under pyinstrument and write its text report here",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where to write the JSON"
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="write only the JSON, not docs/benchmarks.md and its chart",
    )
    return parser.parse_args(argv)


def sizes_for(args: argparse.Namespace) -> Sizes:
    sizes = _default_sizes(args.quick)
    if args.bulk_mib:
        sizes = dataclasses.replace(sizes, bulk_mib=args.bulk_mib)
    if args.repeat:
        sizes = dataclasses.replace(sizes, repeat=args.repeat)
    return sizes


def _default_sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(
            BULK_MIB // 16,
            FRESH_REQUESTS // 10,
            CONCURRENT_CLIENTS,
            CONCURRENT_SECONDS / 10,
            SIGNER_CONNECTIONS // 10,
            IDLE_TUNNELS // 10,
            1,
        )
    return Sizes(
        BULK_MIB,
        FRESH_REQUESTS,
        CONCURRENT_CLIENTS,
        CONCURRENT_SECONDS,
        SIGNER_CONNECTIONS,
        IDLE_TUNNELS,
        REPEAT,
    )


def run(args: argparse.Namespace) -> dict[str, object]:
    sizes = sizes_for(args)
    raise_open_file_limit()
    rows: list[Row] = []
    processes: list[Process] = []
    stops: list[Callable[[], None]] = []
    # Under /dev/shm the 1 GiB file and the uploads stay in memory, so no
    # path waits for a disk.
    shm = Path("/dev/shm")  # noqa: S108 (mkdtemp makes a private 0700 directory)
    work = Path(
        tempfile.mkdtemp(prefix="kmsproxy-bench-", dir=shm if shm.is_dir() else None)
    )
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    # Key sources point XDG_CONFIG_HOME and SOFTHSM2_CONF into the work
    # directory for the proxies they start; nothing after the run may use it.
    environment = dict(os.environ)
    try:
        keys = servers.make_keys(work)
        content = work / "content"
        (content / "upload").mkdir(parents=True)
        with (content / "big").open("wb") as big:
            big.truncate(sizes.bulk_mib * 2**20)
        (content / "small").write_bytes(b"x" * servers.SMALL_BODY_BYTES)
        upstream = servers.start_upstream(work, keys, content)
        processes.append(upstream.process)
        contenders = build_contenders(
            args, work, keys, upstream, processes, stops, rows
        )
        for contender in contenders:
            if (
                args.only
                and contender.name != "direct"
                and contender.name not in args.only
            ):
                continue
            row = Row(contender.name, contender.label)
            rows.append(row)
            try:
                measure_startup(contender, row, sizes)
                measure(contender, row, upstream, sizes)
            except (clients.BenchError, servers.StartError, OSError) as error:
                row.status = "failed"
                row.note = str(error).splitlines()[0]
                log(f"{row.name}: failed: {error}")
            finally:
                if contender.proxy_process is not None:
                    contender.proxy_process.stop()
    finally:
        for process in processes:
            process.stop()
        for stop in stops:
            stop()
        os.environ.clear()
        os.environ.update(environment)
        shutil.rmtree(work, ignore_errors=True)
    meta = machine()
    meta["duration"] = f"{(time.monotonic() - started) / 60:.1f} min"
    # Other work on the machine shows up here; the harness cannot stop it.
    meta["load"] = (
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    return {
        "machine": meta,
        "sizes": sizes.__dict__,
        "quick": args.quick,
        "rows": [row.__dict__ for row in rows],
    }


def run_signers(args: argparse.Namespace) -> dict[str, object]:
    """Run the signer latency section; return its part of results.json."""
    signatures, rounds = signers.SIGNATURES, signers.ROUNDS
    if args.quick:
        signatures, rounds = signatures // 10, 1
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="kmsproxy-bench-signers-"))
    try:
        rows = signers.measure(work, signatures, rounds, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = machine()
    meta.update(signers.versions())
    meta["duration"] = f"{(time.monotonic() - started) / 60:.1f} min"
    meta["load"] = (
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    return {
        "machine": meta,
        "signatures": signatures,
        "rounds": rounds,
        "quick": args.quick,
        "rows": [row.__dict__ for row in rows],
    }


def run_handshake(args: argparse.Namespace) -> dict[str, object]:
    """Run the TLS client handshake section; return its part of results.json."""
    handshakes, rounds = handshake.HANDSHAKES, handshake.ROUNDS
    if args.quick:
        handshakes, rounds = handshakes // 10, 1
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    rows = handshake.measure(handshakes, rounds)
    meta = machine()
    meta["python ssl"] = ssl.OPENSSL_VERSION
    meta["duration"] = f"{time.monotonic() - started:.0f} s"
    meta["load"] = (
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    return {
        "machine": meta,
        "handshakes": handshakes,
        "rounds": rounds,
        "quick": args.quick,
        "rows": [dataclasses.asdict(row) for row in rows],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        args.profile = args.profile.resolve()
    if args.mitmdump:
        # Processes run in the work directory, so relative paths would break.
        args.mitmdump = str(Path(args.mitmdump).resolve())
    sections_only = args.only is not None and set(args.only) <= SECTIONS
    if sections_only:
        # Keep the contenders' figures of the last full run.
        if not args.results.exists():
            raise SystemExit(
                f"{args.results} not found: `--only {' '.join(args.only)}` adds "
                "its section to the results of an earlier run (run without "
                "--only first)"
            )
        results = json.loads(args.results.read_text())
    else:
        results = run(args)
        if args.mitmdump:
            results["machine"]["mitmproxy"] = mitmproxy_version(args.mitmdump)  # type: ignore[index]
    if args.only is None or SIGNERS in args.only:
        results["signers"] = run_signers(args)
    if args.only is None or HANDSHAKE in args.only:
        results["handshake"] = run_handshake(args)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.results}")
    if not args.no_report:
        report.main([str(args.results)])
    return 0


def mitmproxy_version(mitmdump: str) -> str:
    result = subprocess.run(
        [mitmdump, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    # The first line reads "Mitmproxy: 11.0.2".
    return result.stdout.split()[1] if result.stdout else "unknown"


if __name__ == "__main__":
    sys.exit(main())
