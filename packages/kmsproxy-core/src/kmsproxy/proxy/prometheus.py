"""The `/metrics` page of the PAC listener, in the Prometheus text format.

The page joins the TLS client's process-wide counters (`kmsproxy.metrics`)
with the proxy's own tunnel and minting counts. The PAC listener serves
it to loopback clients only, even when it listens on another address,
because the counts reveal how often each kind of work happens.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmsproxy.metrics import MetricsSnapshot
from kmsproxy.proxy.connect import RequestHead
from kmsproxy.proxy.tunnel import TunnelCounters

# The request path that returns the metrics page instead of the PAC file.
METRICS_PATH = "/metrics"

# Prometheus text exposition format, version 0.0.4.
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class ProxyCounts:
    """The proxy's counts at one moment, next to the TLS client's snapshot."""

    tls: MetricsSnapshot
    tunnels: TunnelCounters
    minted_certificates: int
    minted_error_certificates: int
    minted_listener_certificates: int = 0


def is_metrics_request(head: RequestHead) -> bool:
    """Tell whether `head` asks for the metrics page (query string ignored)."""
    return head.target.partition("?")[0] == METRICS_PATH


def render_metrics(counts: ProxyCounts) -> str:
    """Format `counts` as Prometheus text, one HELP and TYPE per family."""
    families = [
        (
            "kmsproxy_signer_calls_total",
            "counter",
            "Signatures made with a client key (TLS CertificateVerify).",
            [("", counts.tls.signer_calls)],
        ),
        (
            "kmsproxy_upstream_handshakes_total",
            "counter",
            "Upstream TLS handshakes completed, by kind; resumed ones sign nothing.",
            [
                ('{kind="full"}', counts.tls.full_handshakes),
                ('{kind="resumed"}', counts.tls.resumed_handshakes),
            ],
        ),
        (
            "kmsproxy_tunnels_open",
            "gauge",
            "Tunnels open now.",
            [("", counts.tunnels.open)],
        ),
        (
            "kmsproxy_tunnels_total",
            "counter",
            "CONNECT requests that started a tunnel.",
            [("", counts.tunnels.total)],
        ),
        (
            "kmsproxy_tunnels_failed_total",
            "counter",
            "Tunnels that failed before relaying, or whose upstream sent an "
            "alert after the rejection wait and before any data.",
            [("", counts.tunnels.failed)],
        ),
        (
            "kmsproxy_certificates_minted_total",
            "counter",
            "Leaf certificates minted by the local CA, by purpose.",
            [
                ('{purpose="upstream"}', counts.minted_certificates),
                ('{purpose="error_page"}', counts.minted_error_certificates),
                ('{purpose="listener"}', counts.minted_listener_certificates),
            ],
        ),
    ]
    lines: list[str] = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)
    return "\n".join(lines) + "\n"


def metrics_response(head: RequestHead, counts: ProxyCounts) -> bytes:
    """Build the response to `GET /metrics` (or HEAD)."""
    body = render_metrics(counts).encode("utf-8")
    fields = (
        f"HTTP/1.1 200 OK\r\nContent-Type: {METRICS_MEDIA_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-cache\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return fields if head.method == "HEAD" else fields + body
