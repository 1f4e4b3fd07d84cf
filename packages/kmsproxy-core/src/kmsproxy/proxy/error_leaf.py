"""Leaves that carry only an error page, for tunnels whose upstream failed.

When the upstream TLS handshake fails after the 200 response, the client is
already starting TLS for the CONNECT host. To show it a 502 page the proxy
needs a certificate for that host, but no upstream certificate was
verified. These leaves are therefore built from the CONNECT host name alone
and live `ERROR_LEAF_LIFETIME`. They have their own key and their own cache,
kept apart from `LeafMinter`, so a tunnel whose upstream succeeds never
receives one.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from kmsproxy.ca import LeafRequest, LocalCA, server_context

logger = logging.getLogger(__name__)

# Lifetime of an error-page leaf. The page is read once, right after the
# handshake, so minutes suffice, and a leaked leaf is useless soon after.
ERROR_LEAF_LIFETIME = datetime.timedelta(minutes=10)

# A cached error context is minted again once its leaf has less than this
# left, so a client never receives one that expires mid-handshake.
ERROR_LEAF_RENEW_BEFORE = datetime.timedelta(minutes=2)

# Maximum number of error contexts kept (least recently used evicted). A
# browser retries a failing host a few times; this bounds the CA signatures
# that a burst of failures costs without holding many contexts.
ERROR_LEAF_CACHE_SIZE = 32


@dataclass
class _Entry:
    context: ssl.SSLContext
    not_after: datetime.datetime


class ErrorLeafMinter:
    """Server contexts whose leaf names only the CONNECT host."""

    def __init__(self, ca: LocalCA, cache_size: int = ERROR_LEAF_CACHE_SIZE) -> None:
        self.ca = ca
        self.cache_size = cache_size
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.mint_count = 0
        self._cache: collections.OrderedDict[tuple[str, tuple[str, ...]], _Entry] = (
            collections.OrderedDict()
        )

    async def context_for(
        self, host: str, alpn_protocols: Sequence[str] = ()
    ) -> ssl.SSLContext:
        """Return a context for `host` (a DNS name or an IP literal)."""
        key = (host, tuple(alpn_protocols))
        now = datetime.datetime.now(datetime.UTC)
        entry = self._cache.get(key)
        if entry is not None and entry.not_after - now > ERROR_LEAF_RENEW_BEFORE:
            self._cache.move_to_end(key)
            return entry.context
        request = error_leaf_request(host, now, alpn_protocols)
        certificate = await self.ca.mint_leaf(request, self.leaf_key.public_key())
        self.mint_count += 1
        logger.debug(
            "Minted error-page certificate host=%s not_after=%s",
            host,
            certificate.not_valid_after_utc.isoformat(),
        )
        context = server_context(
            [certificate, self.ca.certificate], self.leaf_key, alpn_protocols
        )
        self._cache[key] = _Entry(context, certificate.not_valid_after_utc)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return context


def error_leaf_request(
    host: str, now: datetime.datetime, alpn_protocols: Sequence[str] = ()
) -> LeafRequest:
    """Describe an error-page leaf: `host` as the only name, short-lived."""
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        return LeafRequest(
            common_name=host,
            dns_names=(host,),
            not_after=now + ERROR_LEAF_LIFETIME,
            alpn_protocols=tuple(alpn_protocols),
        )
    return LeafRequest(
        common_name=address,
        ip_addresses=(address,),
        not_after=now + ERROR_LEAF_LIFETIME,
        alpn_protocols=tuple(alpn_protocols),
    )
