"""Backend discovery: which installed backend opens which key or certificate.

The registry loads every entry point in the `kmsproxy` group through pluggy
and collects each backend's URI schemes. An argument that is an existing
path goes to the file backend. Anything else is parsed as a `KeyURI`, and
its scheme selects the backend. It raises `UserError` for a scheme that no
installed backend claims, and for two backends that claim one scheme.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pluggy

from kmsproxy.certificates import CertificateSource
from kmsproxy.errors import UserError
from kmsproxy.plugins import hookspecs
from kmsproxy.signer import Signer
from kmsproxy.uri import KeyURI, looks_like_uri

FILE_SCHEME = "file"

# Schemes of backends published separately, with the distribution to install
# when a URI names one that is missing.
KNOWN_DISTRIBUTIONS = {
    "tpmkms": "kmsproxy-tpm",
    "yubikey": "kmsproxy-yubikey",
    "pkcs11": "kmsproxy-pkcs11",
    "awskms": "kmsproxy-awskms",
}

# Distributions above that are planned but not on any package index yet.
# For them no `pip install NAME` is printed: it would install whatever
# someone else uploads under that name.
UNRELEASED_DISTRIBUTIONS = frozenset(KNOWN_DISTRIBUTIONS.values())

# Where the status of each planned backend is documented.
BACKENDS_DOCUMENT = "docs/backends/README.md"


def install_hint(scheme: str) -> str | None:
    """Return how to get the backend for `scheme`, or None if unknown.

    For a released distribution this is the `pip install` command; for an
    unreleased one it names the distribution and says it is not released.
    """
    distribution = KNOWN_DISTRIBUTIONS.get(scheme)
    if distribution is None:
        return None
    if distribution in UNRELEASED_DISTRIBUTIONS:
        return (
            f"{distribution} will provide it, but is not released yet "
            f"(see {BACKENDS_DOCUMENT})"
        )
    return f"install it with: pip install {distribution}"


@dataclass(frozen=True)
class Backend:
    """An installed backend: its plugin name, schemes and distribution."""

    name: str
    schemes: tuple[str, ...]
    distribution: str | None
    plugin: object


class Registry:
    """Installed backends, and the routing of arguments to them."""

    def __init__(self, plugin_manager: pluggy.PluginManager) -> None:
        self.plugin_manager = plugin_manager
        self.backends = _collect_backends(plugin_manager)
        self._by_scheme: dict[str, Backend] = {}
        for backend in self.backends:
            for scheme in backend.schemes:
                other = self._by_scheme.get(scheme)
                if other is not None:
                    raise UserError(
                        f"backends {other.name!r} and {backend.name!r} both claim "
                        f"the URI scheme {scheme!r}; uninstall one of them"
                    )
                self._by_scheme[scheme] = backend

    @classmethod
    def load(
        cls, plugins: Iterable[object] = (), *, entry_points: bool = True
    ) -> Registry:
        """Load the `kmsproxy` entry points, plus `plugins` (for tests)."""
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        if entry_points:
            manager.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
        for plugin in plugins:
            manager.register(plugin)
        return cls(manager)

    @property
    def schemes(self) -> list[str]:
        return sorted(self._by_scheme)

    def resolve(self, argument: str) -> KeyURI:
        """Turn an argument into a URI: a path becomes `file:path=...`."""
        if Path(argument).expanduser().exists():
            return KeyURI(FILE_SCHEME, {"path": argument}, raw=argument)
        if not looks_like_uri(argument):
            raise UserError(
                f"{argument}: no such file, and not a URI of the form scheme:name=value"
            )
        return KeyURI.parse(argument)

    def backend_for(self, uri: KeyURI) -> Backend:
        backend = self._by_scheme.get(uri.scheme)
        if backend is not None:
            return backend
        installed = ", ".join(self.schemes) or "none"
        message = (
            f"{uri.redacted()}: no installed backend handles the scheme "
            f"{uri.scheme!r} (installed: {installed})"
        )
        hint = install_hint(uri.scheme)
        if hint is not None:
            message += f"; {hint}"
        raise UserError(message)

    def open_signer(self, argument: str) -> Signer:
        """Open the private key named by a path or URI."""
        uri = self.resolve(argument)
        caller = self._caller_for(uri, "kmsproxy_open_signer")
        signer: Signer | None = caller(uri=uri)
        if signer is None:
            raise UserError(f"{uri.redacted()}: the backend could not open this key")
        return signer

    def open_certificates(self, argument: str) -> CertificateSource:
        """Open the certificate chain named by a path or URI."""
        uri = self.resolve(argument)
        caller = self._caller_for(uri, "kmsproxy_open_certificates")
        source: CertificateSource | None = caller(uri=uri)
        if source is None:
            raise UserError(
                f"{uri.redacted()}: the backend does not provide certificates; "
                "give --clientcert as a file"
            )
        return source

    def _caller_for(self, uri: KeyURI, hook_name: str) -> pluggy.HookCaller:
        """Return a hook caller restricted to the backend owning `uri`'s scheme."""
        owner = self.backend_for(uri)
        others = [p for p in self.plugin_manager.get_plugins() if p is not owner.plugin]
        return self.plugin_manager.subset_hook_caller(hook_name, others)


def _collect_backends(manager: pluggy.PluginManager) -> list[Backend]:
    distributions = {
        id(plugin): dist.project_name for plugin, dist in manager.list_plugin_distinfo()
    }
    backends: list[Backend] = []
    for implementation in manager.hook.kmsproxy_schemes.get_hookimpls():
        schemes = implementation.function()
        if not isinstance(schemes, list | tuple):
            raise UserError(
                f"backend {implementation.plugin_name!r}: kmsproxy_schemes "
                f"returned {schemes!r}, expected a list of scheme names"
            )
        backends.append(
            Backend(
                name=implementation.plugin_name,
                schemes=tuple(str(s).lower() for s in schemes),
                distribution=distributions.get(id(implementation.plugin)),
                plugin=implementation.plugin,
            )
        )
    backends.sort(key=lambda backend: backend.name)
    return backends
