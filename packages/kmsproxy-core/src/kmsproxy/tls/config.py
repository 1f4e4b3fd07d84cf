"""Settings the caller chooses for one upstream connection: the server name,
the client identities, the trust store and ALPN."""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from ..signer import SIGNATURE_TIMEOUT_SECONDS, Signer
from .verify import TrustStore

if TYPE_CHECKING:
    from .session_cache import SessionCache

# Time allowed for the whole handshake, from ClientHello to our Finished. It
# covers network round trips plus one client signature, and a hardware
# signer (TPM, PKCS#11 token, cloud KMS) may take seconds per signature. The
# 30 s value is an estimate with room for a slow token, not a measurement.
HANDSHAKE_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate chain (leaf first) and the signer of its key."""

    chain: tuple[x509.Certificate, ...]
    signer: Signer


def is_ip_literal(server_name: str) -> bool:
    try:
        ipaddress.ip_address(server_name)
    except ValueError:
        return False
    return True


@dataclass
class TLSClientConfig:
    """Settings for one connection.

    `server_name` is the CONNECT host. A DNS name is sent as SNI and matched
    against DNSName SANs. An IP literal, without brackets, is matched against
    IPAddress SANs and never sent as SNI (RFC 6066 section 3). `trust=None` skips chain
    and name verification but still checks the server's CertificateVerify
    and Finished.

    With both `session_cache` and `session_key`, the client offers a stored
    ticket for `session_key` and stores the tickets the server sends. The key
    must tell apart everything a resumed session inherits without checking
    it again: the upstream (host, port, SNI), the trust settings and the
    client identities.
    """

    server_name: str
    identities: Sequence[ClientIdentity] = ()
    trust: TrustStore | None = None
    alpn_protocols: Sequence[str] = ()
    handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS
    signature_timeout: float = SIGNATURE_TIMEOUT_SECONDS
    session_cache: SessionCache | None = None
    session_key: Hashable | None = None

    def __post_init__(self) -> None:
        name = self.server_name
        if not name or not name.isascii() or name.startswith("["):
            raise ValueError(
                f"server name {name!r} must be an ASCII DNS name (IDNA A-labels) "
                "or an IP address without brackets"
            )
        for protocol in self.alpn_protocols:
            if not 1 <= len(protocol.encode()) <= 255:
                raise ValueError(
                    f"ALPN protocol {protocol!r} must be 1 to 255 bytes (RFC 7301)"
                )
