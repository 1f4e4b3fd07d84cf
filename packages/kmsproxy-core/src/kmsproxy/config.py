"""`ProxyConfig`: everything `Proxy` needs, as `kmsproxy serve` builds it.

Keys and certificates are paths, URIs (`tpmkms:name=...`) or ready objects
(`Signer`, `CertificateSource`) for programs that embed the proxy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmsproxy.certificates import CertificateSource
from kmsproxy.signer import Signer

# The Go step-kmsproxy-plugin's default ports; clients configured for it
# work unchanged.
DEFAULT_LISTEN = "localhost:8090"
DEFAULT_PAC_LISTEN = "localhost:8091"

# Seconds to wait for the upstream's TCP connection: long enough for a slow
# VPN, short enough that a client sees 502 before it gives up itself.
CONNECT_TIMEOUT_SECONDS = 10.0

# Seconds a tunnel may pass with no byte in either direction before both
# sides are closed; nginx's stream proxy_timeout defaults to the same 10 min.
IDLE_TIMEOUT_SECONDS = 600.0

KeySpec = str | os.PathLike[str] | Signer
CertificateSpec = str | os.PathLike[str] | CertificateSource


@dataclass
class ProxyConfig:
    """Settings for one `Proxy`.

    `listen` and `pac_listen` take `host:port`, `tcp:host:port` or
    `[v6]:port`; `pac_listen=None` disables the PAC listener. `trust` lists
    extra PEM bundles checked besides the system store (unless
    `include_system_trust` is false). `insecure_skip_verify` accepts any
    upstream certificate and is logged as a warning at start.
    `max_connections` caps the connections served at once; None derives the
    cap from RLIMIT_NOFILE (see `kmsproxy.proxy.accept.connection_limit`).
    `handle_signals` makes the proxy install a SIGHUP handler that reloads
    the identities. It is off by default so that an embedding program keeps
    its own handlers. `kmsproxy serve` turns it on.
    """

    ca_key: KeySpec
    ca_certificate: CertificateSpec
    client_keys: Sequence[KeySpec]
    client_certificates: Sequence[CertificateSpec]
    trust: Sequence[Path] = ()
    include_system_trust: bool = True
    listen: str = DEFAULT_LISTEN
    pac_listen: str | None = DEFAULT_PAC_LISTEN
    pac_file: Path | None = None
    insecure_skip_verify: bool = False
    handle_signals: bool = False
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS
    idle_timeout: float = IDLE_TIMEOUT_SECONDS
    max_connections: int | None = None
    plugins: Sequence[object] = field(default_factory=tuple)
