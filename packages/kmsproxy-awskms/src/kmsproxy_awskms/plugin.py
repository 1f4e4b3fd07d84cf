"""Hooks of the kmsproxy-awskms backend: `awskms:` URIs name AWS KMS keys.

KMS stores no certificates, so this backend opens keys only; give
`--clientcert` (and the CA certificate) as files.
"""

from __future__ import annotations

from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.signer import Signer
from kmsproxy.uri import KeyURI
from kmsproxy_awskms.service import SCHEME
from kmsproxy_awskms.signer import open_signer


@hookimpl
def kmsproxy_schemes() -> list[str]:
    return [SCHEME]


@hookimpl
def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
    if uri.scheme != SCHEME:
        return None
    return open_signer(uri)
