"""kmsproxy: a local HTTPS proxy whose client certificate key stays in hardware.

Embedding the proxy in another anyio program::

    config = ProxyConfig(
        ca_key="ca.key",
        ca_certificate="ca.crt",
        client_keys=["tpmkms:name=client"],
        client_certificates=["client.crt"],
    )
    async with anyio.create_task_group() as group:
        addresses = await group.start(Proxy(config).serve)
        ...  # use addresses.proxy_url
        group.cancel_scope.cancel()
"""

from importlib.metadata import PackageNotFoundError, version

from kmsproxy.ca import LeafMinter, LocalCA, MintError
from kmsproxy.certificates import CertificateError, CertificateSource
from kmsproxy.config import ProxyConfig
from kmsproxy.errors import UserError
from kmsproxy.identity import Identity, IdentityStore
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.plugins.registry import Registry
from kmsproxy.proxy import Proxy, ProxyAddresses
from kmsproxy.signer import (
    BlockingSigner,
    SignatureScheme,
    Signer,
    SignerError,
    SoftwareSigner,
)
from kmsproxy.uri import KeyURI, URIError

try:
    __version__ = version("kmsproxy-core")
except PackageNotFoundError:  # running from a source tree without metadata
    __version__ = "0.0.0"

__all__ = [
    "BlockingSigner",
    "CertificateError",
    "CertificateSource",
    "Identity",
    "IdentityStore",
    "KeyURI",
    "LeafMinter",
    "LocalCA",
    "MintError",
    "Proxy",
    "ProxyAddresses",
    "ProxyConfig",
    "Registry",
    "SignatureScheme",
    "Signer",
    "SignerError",
    "SoftwareSigner",
    "URIError",
    "UserError",
    "__version__",
    "hookimpl",
]
