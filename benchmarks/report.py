"""Turn benchmarks/results.json into docs/benchmarks.md's results and chart.

Only the text between the `<!-- results: start -->` and `<!-- results: end
-->` marks of the page is replaced; the method and the optimisation log
around it are written by hand. Run it alone to redraw from saved results:

    python benchmarks/report.py benchmarks/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "benchmarks.png"
START_MARK = "<!-- results: start -->"
END_MARK = "<!-- results: end -->"


@dataclass(frozen=True)
class Metric:
    """One column of results: its key in the JSON, heading and direction."""

    key: str
    heading: str
    higher_is_better: bool
    digits: int = 1


METRICS = (
    Metric("download_mbps", "download MB/s", True, 0),
    Metric("upload_mbps", "upload MB/s", True, 0),
    Metric("latency_p50_ms_resumed", "fresh p50 ms, resumed", False, 2),
    Metric("latency_p99_ms_resumed", "fresh p99 ms, resumed", False, 2),
    Metric("latency_p50_ms_full", "fresh p50 ms, full", False, 2),
    Metric("latency_p99_ms_full", "fresh p99 ms, full", False, 2),
    Metric("requests_per_second", "requests/s, 50 clients", True, 0),
    Metric("signer_calls_per_1000", "signer calls per 1,000 connections", False, 0),
    Metric("idle_rss_mib", "RSS MiB, idle tunnels", False, 1),
    Metric("rss_per_tunnel_kib", "KiB per idle tunnel", False, 1),
    Metric("startup_seconds", "start to first response, s", False, 2),
)

# The proxy's own CPU time per MB relayed, in its own table. The direct
# path has no process in between, so these cells compare with mitmproxy.
CPU_METRICS = (
    Metric("download_cpu_ms_per_mb", "download, ms CPU per MB", False, 2),
    Metric("upload_cpu_ms_per_mb", "upload, ms CPU per MB", False, 2),
)

# The row whose median the CPU cells are divided by.
CPU_BASELINE = "mitmproxy"

# The metrics the chart shows as ratios to the direct path.
CHART_METRICS = (
    "download_mbps",
    "upload_mbps",
    "requests_per_second",
    "latency_p50_ms_resumed",
    "latency_p50_ms_full",
)


def summary(values: list[float]) -> tuple[float, float, float]:
    """Return (median, min, max)."""
    return statistics.median(values), min(values), max(values)


def format_cell(
    values: list[float] | None, direct: list[float] | None, metric: Metric
) -> str:
    if not values:
        return "–"
    median, low, high = summary(values)
    text = f"{median:,.{metric.digits}f}"
    if len(values) > 1:
        text += f" ({low:,.{metric.digits}f}–{high:,.{metric.digits}f})"
    if direct and metric.key not in ("signer_calls_per_1000",):
        direct_median = statistics.median(direct)
        if direct_median:
            text += f" ×{median / direct_median:.2f}"
    return text


def render(results: dict[str, Any]) -> str:
    """Render the results section: sizes, machine, then one table per
    group of metrics with a row per contender."""
    rows: list[dict[str, Any]] = results["rows"]
    direct = next((row for row in rows if row["name"] == "direct"), None)
    direct_values: dict[str, list[float]] = direct["values"] if direct else {}
    sizes = results["sizes"]
    lines = []
    if results.get("quick"):
        lines += [
            "**These figures come from a `--quick` trial run and are not "
            "comparable with a full run.**",
            "",
        ]
    machine = results["machine"]
    lines += [
        f"Measured {machine['date']} in {machine['duration']} on {machine['cores']} "
        f"cores of an {machine['cpu']} (Linux {machine['kernel']}), Python "
        f"{machine['python']}, kmsproxy at commit {machine['kmsproxy commit']}. "
        f"Load average (1 min): {machine.get('load', 'not recorded')}.",
        "",
        f"Sizes: {sizes['bulk_mib']} MiB per transfer, {sizes['fresh_requests']} "
        f"fresh requests per round, {sizes['concurrent_clients']} clients for "
        f"{sizes['concurrent_seconds']:g} s, {sizes['signer_connections']} "
        f"connections for the signer count, {sizes['idle_tunnels']} idle tunnels; "
        f"rounds of each timed measurement: {sizes['repeat']}.",
        "",
        "Each cell is the median, (min–max) over the rounds, and ×ratio to the "
        "direct path's median in the same run.",
        "",
    ]
    groups = (METRICS[:2], METRICS[2:6], METRICS[6:8], METRICS[8:])
    for group in groups:
        lines.append("| path | " + " | ".join(m.heading for m in group) + " |")
        lines.append("| --- |" + " --- |" * len(group))
        for row in rows:
            if row["status"] != "measured":
                continue
            cells = [
                format_cell(row["values"].get(m.key), direct_values.get(m.key), m)
                for m in group
            ]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    others = [row for row in rows if row["status"] != "measured"]
    if others:
        lines.append("Not measured in this run:")
        lines.append("")
        lines += [f"- {row['label']}: {row['status']}, {row['note']}" for row in others]
        lines.append("")
    lines += [
        "Targets, for kmsproxy with a file key (`kmsproxy serve` as shipped):",
        "",
        render_targets(results),
        "",
    ]
    versions = [
        f"{name} {machine[name]}"
        for name in ("nginx", "curl", "openssl", "mitmproxy")
        if name in machine
    ]
    lines.append("Versions: " + "; ".join(versions) + ".")
    cpu_table = render_cpu(rows)
    if cpu_table:
        lines += ["", cpu_table]
    if "signers" in results:
        lines += ["", render_signers(results["signers"])]
    if "handshake" in results:
        lines += ["", render_handshake(results["handshake"])]
    return "\n".join(lines)


def render_cpu(rows: list[dict[str, Any]]) -> str:
    """Render the proxy CPU per MB table, or "" for results without it.

    Results written before the harness measured CPU have no such values.
    """
    measured = [
        row
        for row in rows
        if row["status"] == "measured"
        and any(m.key in row["values"] for m in CPU_METRICS)
    ]
    if not measured:
        return ""
    baseline = next((row for row in measured if row["name"] == CPU_BASELINE), None)
    if baseline is None:
        ratio_text = "mitmproxy was not measured in this run, so no cell has a ratio."
    else:
        ratio_text = (
            "Each cell is the median, (min–max) over the rounds, and ×ratio to "
            "mitmproxy's median in the same run."
        )
    lines = [
        "### Proxy CPU per MB relayed",
        "",
        "User plus system CPU time of the proxy's process, with its threads and "
        "child processes, during each bulk transfer above, per MB (10^6 bytes) "
        "of body. " + ratio_text,
        "",
        "| path | " + " | ".join(m.heading for m in CPU_METRICS) + " |",
        "| --- |" + " --- |" * len(CPU_METRICS),
    ]
    for row in measured:
        cells = []
        for metric in CPU_METRICS:
            base = None
            if baseline is not None and row is not baseline:
                base = baseline["values"].get(metric.key)
            cells.append(format_cell(row["values"].get(metric.key), base, metric))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_handshake(section: dict[str, Any]) -> str:
    """Render the TLS client handshake table, one row per client and kind."""
    machine = section["machine"]
    lines = ["### CPU per TLS client handshake", ""]
    if section.get("quick"):
        lines += [
            "**These figures come from a `--quick` trial run and are not "
            "comparable with a full run.**",
            "",
        ]
    lines += [
        f"Measured {machine['date']} in {machine['duration']} on {machine['cores']} "
        f"cores of an {machine['cpu']}, Python {machine['python']} "
        f"({machine['python ssl']}), kmsproxy at commit "
        f"{machine['kmsproxy commit']}. Load average (1 min): {machine['load']}.",
        "",
        "`benchmarks/handshake.py` runs handshakes with a P-256 client "
        "certificate against Python's `ssl` server in memory, in TLS 1.3 unless "
        "the row says TLS 1.2, and times the client's CPU only. Each round runs "
        f"{section['handshakes']} handshakes and keeps their median. Each cell "
        f"is the median, (min–max) over {section['rounds']} rounds, and ×ratio "
        "to Python's `ssl` client doing the same handshake in the same run. "
        "In the full rows, kmsproxy's client generates an X25519MLKEM768 and "
        "an x25519 key share, and Python's `ssl` client on OpenSSL 3.0 one "
        "x25519 share.",
        "",
        "| client | handshake | µs of client CPU |",
        "| --- | --- | --- |",
    ]
    rows: list[dict[str, Any]] = section["rows"]
    baselines = {
        row["handshake"]: row["medians_us"]
        for row in rows
        if row["client"] != "kmsproxy"
    }
    metric = Metric("medians_us", "µs of client CPU", False, 0)
    for row in rows:
        is_kmsproxy = row["client"] == "kmsproxy"
        baseline = baselines.get(row["handshake"]) if is_kmsproxy else None
        cell = format_cell(row["medians_us"], baseline, metric)
        lines.append(f"| {row['client']} | {row['handshake']} | {cell} |")
    return "\n".join(lines)


def render_signers(section: dict[str, Any]) -> str:
    """Render the signer latency table, one row per key source and key type."""
    machine = section["machine"]
    lines = ["### Signature latency per key source", ""]
    if section.get("quick"):
        lines += [
            "**These figures come from a `--quick` trial run and are not "
            "comparable with a full run.**",
            "",
        ]
    lines += [
        f"Measured {machine['date']} in {machine['duration']} on {machine['cores']} "
        f"cores of an {machine['cpu']}, Python {machine['python']}, kmsproxy at "
        f"commit {machine['kmsproxy commit']}, swtpm {machine['swtpm']}, "
        f"SoftHSM2 {machine['softhsm2']}, moto {machine['moto']}. Load average "
        f"(1 min): {machine['load']}.",
        "",
        f"Each round times {section['signatures']} calls of `Signer.sign` and "
        f"keeps their median. Each cell is the median, (min–max) over "
        f"{section['rounds']} rounds, and ×ratio to the software key of the same "
        "type in the same run.",
        "",
        "| key source | key | scheme | ms per signature |",
        "| --- | --- | --- | --- |",
    ]
    rows: list[dict[str, Any]] = section["rows"]
    baselines = {
        row["key_type"]: row["values"]
        for row in rows
        if row["source"] == "software" and row["status"] == "measured"
    }
    for row in rows:
        if row["status"] != "measured":
            continue
        metric = Metric("ms_per_signature", "ms per signature", False, 3)
        cell = format_cell(row["values"], baselines.get(row["key_type"]), metric)
        lines.append(
            f"| {row['label']} | {row['key_type']} | `{row['scheme']}` | {cell} |"
        )
    lines += _scheme_note(rows)
    others = [row for row in rows if row["status"] != "measured"]
    if others:
        lines += ["", "Not measured in this run:", ""]
        lines += [
            f"- {row['label']}, {row['key_type']}: {row['status']}, {row['note']}"
            for row in others
        ]
    return "\n".join(lines)


def _scheme_note(rows: list[dict[str, Any]]) -> list[str]:
    """List the rows that sign with another scheme than their software key."""
    baseline_schemes = {
        row["key_type"]: row["scheme"] for row in rows if row["source"] == "software"
    }
    differing = [
        row
        for row in rows
        if row["status"] == "measured"
        and row["scheme"] != baseline_schemes.get(row["key_type"])
    ]
    if not differing:
        return []
    return [
        "",
        "Rows whose scheme differs from the software key's, because the key "
        "does not offer that scheme, compare different algorithms: "
        + ", ".join(f"{row['label']} {row['key_type']}" for row in differing)
        + ".",
    ]


# kmsproxy's performance targets, checked against figures from one run.
MIN_RATIO_TO_MITMPROXY = 2.0
MIN_RATIO_TO_DIRECT = 0.4
MAX_ADDED_P50_MS = 1.5
MAX_SIGNER_CALLS_PER_UPSTREAM = 1
MAX_KIB_PER_IDLE_TUNNEL = 64.0


def render_targets(results: dict[str, Any], row_name: str = "kmsproxy-file") -> str:
    """Render a table of the targets: the measured value, met or missed."""
    rows = {row["name"]: row for row in results["rows"] if row["status"] == "measured"}
    if row_name not in rows or "direct" not in rows:
        return f"No measured `{row_name}` row in this run."

    def median(name: str, key: str) -> float | None:
        values = rows.get(name, {}).get("values", {}).get(key)
        return statistics.median(values) if values else None

    def verdict(ok: bool, miss: str) -> str:
        return "met" if ok else f"missed: {miss}"

    lines = ["| target | measured | result |", "| --- | --- | --- |"]
    for key, name in (("download_mbps", "download"), ("upload_mbps", "upload")):
        ours, direct = median(row_name, key), median("direct", key)
        mitm = median("mitmproxy", key)
        if ours is None or direct is None:
            continue
        if mitm:
            ratio = ours / mitm
            lines.append(
                f"| {name} at least {MIN_RATIO_TO_MITMPROXY:g}× mitmproxy's | "
                f"×{ratio:.2f} ({ours:,.0f} against {mitm:,.0f} MB/s) | "
                + verdict(
                    ratio >= MIN_RATIO_TO_MITMPROXY,
                    f"{MIN_RATIO_TO_MITMPROXY * mitm - ours:,.0f} MB/s short",
                )
                + " |"
            )
        ratio = ours / direct
        lines.append(
            f"| {name} at least {MIN_RATIO_TO_DIRECT:.0%} of direct | "
            f"{ratio:.0%} ({ours:,.0f} against {direct:,.0f} MB/s) | "
            + verdict(
                ratio >= MIN_RATIO_TO_DIRECT,
                f"{MIN_RATIO_TO_DIRECT * direct - ours:,.0f} MB/s short",
            )
            + " |"
        )
    lines += _cpu_target_rows(row_name, median, verdict)
    ours, direct = (
        median(row_name, "latency_p50_ms_resumed"),
        median("direct", "latency_p50_ms_resumed"),
    )
    if ours is not None and direct is not None:
        added = ours - direct
        lines.append(
            f"| added p50 per fresh connection with resumption at most "
            f"{MAX_ADDED_P50_MS:g} ms | {added:.2f} ms ({ours:.2f} against "
            f"{direct:.2f} ms) | "
            + verdict(
                added <= MAX_ADDED_P50_MS,
                f"{added - MAX_ADDED_P50_MS:.2f} ms over",
            )
            + " |"
        )
    per_1000 = median(row_name, "signer_calls_per_1000")
    if per_1000 is not None:
        connections = results["sizes"]["signer_connections"]
        calls = round(per_1000 * connections / 1000)
        lines.append(
            f"| at most {MAX_SIGNER_CALLS_PER_UPSTREAM} signer call per upstream "
            f"per ticket lifetime | {calls} in {connections:,} connections to one "
            "upstream | "
            + verdict(
                calls <= MAX_SIGNER_CALLS_PER_UPSTREAM,
                f"{calls - MAX_SIGNER_CALLS_PER_UPSTREAM:g} calls over",
            )
            + " |"
        )
    per_tunnel = median(row_name, "rss_per_tunnel_kib")
    if per_tunnel is not None:
        lines.append(
            f"| at most {MAX_KIB_PER_IDLE_TUNNEL:g} KiB RSS per idle tunnel | "
            f"{per_tunnel:.1f} KiB | "
            + verdict(
                per_tunnel <= MAX_KIB_PER_IDLE_TUNNEL,
                f"{per_tunnel - MAX_KIB_PER_IDLE_TUNNEL:.1f} KiB over",
            )
            + " |"
        )
    return "\n".join(lines)


def _cpu_target_rows(
    row_name: str,
    median: Callable[[str, str], float | None],
    verdict: Callable[[bool, str], str],
) -> list[str]:
    """Render the throughput target's rows measured as CPU per MB relayed.

    When both proxies are CPU-bound and get the same share of a core,
    kmsproxy relays MIN_RATIO_TO_MITMPROXY times mitmproxy's MB/s if it
    spends at most 1/MIN_RATIO_TO_MITMPROXY of mitmproxy's CPU per MB.
    This ratio varies less between runs than the MB/s ratio, because it
    depends less on how much of the cores curl and nginx take.
    """
    lines = []
    for metric, name in zip(CPU_METRICS, ("download", "upload"), strict=True):
        ours, mitm = median(row_name, metric.key), median(CPU_BASELINE, metric.key)
        if ours is None or not mitm:
            continue
        ratio = mitm / ours if ours else float("inf")
        allowed = mitm / MIN_RATIO_TO_MITMPROXY
        lines.append(
            f"| {name} at least {MIN_RATIO_TO_MITMPROXY:g}× mitmproxy's, as "
            "mitmproxy's CPU per MB over kmsproxy's | "
            f"×{ratio:.2f} ({ours:.2f} against {mitm:.2f} ms CPU per MB) | "
            + verdict(
                ratio >= MIN_RATIO_TO_MITMPROXY,
                f"{ours - allowed:.2f} ms CPU per MB over",
            )
            + " |"
        )
    return lines


def write_page(results: dict[str, Any], page: Path) -> None:
    text = page.read_text(encoding="utf-8") if page.exists() else ""
    body = render(results)
    if START_MARK in text and END_MARK in text:
        before, _, rest = text.partition(START_MARK)
        _, _, after = rest.partition(END_MARK)
        text = f"{before}{START_MARK}\n{body}\n{END_MARK}{after}"
    else:
        text = f"{text}\n{START_MARK}\n{body}\n{END_MARK}\n"
    page.write_text(text, encoding="utf-8")


def draw_chart(results: dict[str, Any], chart: Path) -> None:
    """Draw the ratio of each contender to direct for CHART_METRICS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["rows"] if row["status"] == "measured"]
    direct = next(row for row in rows if row["name"] == "direct")
    metrics = [m for m in METRICS if m.key in CHART_METRICS]
    figure, axis = plt.subplots(figsize=(10, 4.5), dpi=100)
    width = 0.8 / max(1, len(rows))
    for index, row in enumerate(rows):
        ratios = []
        for metric in metrics:
            values = row["values"].get(metric.key)
            base = direct["values"].get(metric.key)
            if not values or not base:
                ratios.append(0.0)
                continue
            ratios.append(statistics.median(values) / statistics.median(base))
        positions = [i + index * width for i in range(len(metrics))]
        axis.bar(positions, ratios, width, label=row["label"])
    axis.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(metrics))])
    axis.set_xticklabels([m.heading for m in metrics], fontsize=8)
    axis.axhline(1.0, color="black", linewidth=0.6)
    axis.set_ylabel("ratio to direct (median)")
    axis.set_yscale("log")
    axis.set_title("Throughput (higher is better) and latency (lower is better)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(chart)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--chart", type=Path, default=CHART)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    write_page(results, args.page)
    draw_chart(results, args.chart)
    print(f"wrote {args.page} and {args.chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
