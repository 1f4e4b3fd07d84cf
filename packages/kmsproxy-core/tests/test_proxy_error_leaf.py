"""Error-page leaves, the pre-ServerHello alert, and the /metrics text."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from pki import make_ca

from kmsproxy.ca import LocalCA
from kmsproxy.metrics import MetricsSnapshot
from kmsproxy.proxy.connect import RequestHead
from kmsproxy.proxy.error_leaf import (
    ERROR_LEAF_LIFETIME,
    ErrorLeafMinter,
    error_leaf_request,
)
from kmsproxy.proxy.prometheus import (
    ProxyCounts,
    is_metrics_request,
    render_metrics,
)
from kmsproxy.proxy.tunnel import TunnelCounters, alert_record
from kmsproxy.signer import SoftwareSigner
from kmsproxy.tls import AlertDescription

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_error_leaf_dns_name_only() -> None:
    request = error_leaf_request("a.test", NOW, ("http/1.1",))
    assert request.common_name == "a.test"
    assert request.dns_names == ("a.test",)
    assert request.ip_addresses == ()
    assert request.not_after == NOW + ERROR_LEAF_LIFETIME
    assert request.alpn_protocols == ("http/1.1",)


def test_error_leaf_ip_literal_only() -> None:
    request = error_leaf_request("::1", NOW)
    assert request.dns_names == ()
    assert request.ip_addresses == ("::1",)


@pytest.mark.anyio
async def test_error_leaf_minted_once_per_host() -> None:
    ca = make_ca("local CA")
    minter = ErrorLeafMinter(LocalCA(ca.cert, SoftwareSigner(ca.key, "ca.key")))
    first = await minter.context_for("a.test")
    again = await minter.context_for("a.test")
    other = await minter.context_for("b.test")
    assert first is again
    assert other is not first
    assert minter.mint_count == 2


@pytest.mark.anyio
async def test_error_leaf_names_only_host() -> None:
    ca = make_ca("local CA")
    local_ca = LocalCA(ca.cert, SoftwareSigner(ca.key, "ca.key"))
    minter = ErrorLeafMinter(local_ca)
    request = error_leaf_request("127.0.0.1", datetime.datetime.now(datetime.UTC))
    leaf = await local_ca.mint_leaf(request, minter.leaf_key.public_key())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == []
    assert names.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1")
    ]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= ERROR_LEAF_LIFETIME + datetime.timedelta(minutes=5)


def test_alert_record_bytes() -> None:
    record = alert_record(AlertDescription.unknown_ca)
    assert record == b"\x15\x03\x03\x00\x02\x02\x30"


def test_metrics_path_ignores_query() -> None:
    assert is_metrics_request(RequestHead("GET", "/metrics?x=1", "HTTP/1.1"))
    assert not is_metrics_request(RequestHead("GET", "/metrics/x", "HTTP/1.1"))
    assert not is_metrics_request(RequestHead("GET", "/proxy.pac", "HTTP/1.1"))


def test_metrics_text_format() -> None:
    counts = ProxyCounts(
        tls=MetricsSnapshot(signer_calls=3, full_handshakes=2, resumed_handshakes=7),
        tunnels=TunnelCounters(open=1, total=9, failed=2),
        minted_certificates=4,
        minted_error_certificates=1,
        minted_listener_certificates=5,
    )
    lines = render_metrics(counts).splitlines()
    assert "kmsproxy_signer_calls_total 3" in lines
    assert 'kmsproxy_upstream_handshakes_total{kind="full"} 2' in lines
    assert 'kmsproxy_upstream_handshakes_total{kind="resumed"} 7' in lines
    assert "kmsproxy_tunnels_open 1" in lines
    assert "kmsproxy_tunnels_total 9" in lines
    assert "kmsproxy_tunnels_failed_total 2" in lines
    assert 'kmsproxy_certificates_minted_total{purpose="error_page"} 1' in lines
    assert 'kmsproxy_certificates_minted_total{purpose="listener"} 5' in lines
    # Six families, each declared by exactly one TYPE line.
    types = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(types) == 6
    assert len(set(types)) == len(types)
