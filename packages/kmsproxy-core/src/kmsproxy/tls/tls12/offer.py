"""How the TLS 1.3 client also offers TLS 1.2, and when it offers 1.2 alone.

`add_tls12_offer` extends a TLS 1.3 ClientHello so that a TLS 1.2 server
can accept it (RFC 8446 section 4.2.1): 0x0303 in supported_versions, the
TLS 1.2 suites after the 1.3 ones, and the extensions TLS 1.2 needs.
`offers_tls12_only` decides when TLS 1.3 cannot work for our keys.
"""

from __future__ import annotations

import logging
import threading

from .. import messages as m
from ..config import TLSClientConfig
from ..verify import CERTIFICATE_VERIFY_SCHEMES
from .key_schedule12 import CIPHER_SUITES12
from .messages12 import ExtensionType12, push_ec_point_formats, push_renegotiation_info
from .session12 import Session12

logger = logging.getLogger(__name__)

E = m.ExtensionType
E12 = ExtensionType12

# Signer URIs we have logged as TLS 1.2 only, so each is logged once per
# process rather than once per connection.
_logged_tls12_only: set[str] = set()
_logged_lock = threading.Lock()


def add_tls12_offer(
    hello: m.ClientHello, session: Session12 | None, *, request_ticket: bool
) -> m.ClientHello:
    """Return `hello` offering TLS 1.2 as well as TLS 1.3.

    `session` is a TLS 1.2 session whose ticket to offer; `request_ticket`
    requests a new ticket when there is none (RFC 5077 section 3.2). The
    new extensions go before pre_shared_key, which must stay last.
    """
    extensions: list[m.Extension] = []
    for extension_type, data in hello.extensions:
        if extension_type == E.supported_versions:
            data = m.push_supported_versions_client([m.TLS_1_3, m.TLS_1_2])
        extensions.append((extension_type, data))
    added: list[m.Extension] = [
        (E12.ec_point_formats, push_ec_point_formats()),
        (E12.extended_master_secret, b""),
        (E12.renegotiation_info, push_renegotiation_info(b"")),
    ]
    if session is not None:
        added.append((E12.session_ticket, session.ticket))
    elif request_ticket:
        added.append((E12.session_ticket, b""))
    last = len(extensions)
    if extensions and extensions[-1][0] == E.pre_shared_key:
        last -= 1
    extensions[last:last] = added
    return m.ClientHello(
        random=hello.random,
        legacy_session_id=hello.legacy_session_id,
        cipher_suites=[*hello.cipher_suites, *CIPHER_SUITES12],
        extensions=extensions,
        legacy_version=hello.legacy_version,
        legacy_compression_methods=hello.legacy_compression_methods,
    )


def offers_tls12_only(config: TLSClientConfig) -> bool:
    """Return True when no client identity can sign a TLS 1.3
    CertificateVerify, which excludes RSASSA-PKCS1-v1_5 (RFC 8446 4.2.3).

    An RSA key on a token without PSS is the usual case. Offering TLS 1.3
    would then fail with any server that requests a certificate, so the client
    offers TLS 1.2 alone and logs that once per key.
    """
    if not config.identities:
        return False
    for identity in config.identities:
        if any(s in CERTIFICATE_VERIFY_SCHEMES for s in identity.signer.schemes):
            return False
    for identity in config.identities:
        uri = identity.signer.uri
        with _logged_lock:
            if uri in _logged_tls12_only:
                continue
            _logged_tls12_only.add(uri)
        logger.info(
            "offering TLS 1.2 only: key has no scheme TLS 1.3 accepts key=%s "
            "schemes=%s",
            uri,
            ",".join(s.name for s in identity.signer.schemes),
        )
    return True
