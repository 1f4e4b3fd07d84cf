"""Backend discovery: which installed backend opens which key or certificate.

The registry loads every entry point in the `kmsproxy` group through pluggy
and collects each backend's URI schemes. An argument that is an existing
file goes to the backend that claims its format through
`kmsproxy_claim_key_file`, and otherwise to the file backend. Anything else
is parsed as a `KeyURI`, and its scheme selects the backend. It raises
`UserError` for a scheme that no installed backend claims, and for two
backends that claim one scheme.

A backend that fails to load (its module or a C library it needs is
missing, or its `kmsproxy_schemes` hook raises) is kept aside as a
`BrokenBackend` with its error. The other backends keep working, and a URI
whose scheme the broken backend would have handled fails with that error.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from kmsproxy.certificates import CertificateSource
from kmsproxy.errors import UserError
from kmsproxy.files import read_file_head
from kmsproxy.plugins import file as file_backend
from kmsproxy.plugins import hookspecs
from kmsproxy.signer import Signer
from kmsproxy.uri import KeyURI, URIError, looks_like_uri, redact_text

logger = logging.getLogger(__name__)

FILE_SCHEME = "file"

# Bytes of an existing file that `kmsproxy_claim_key_file` receives. PEM
# labels and DER type tags sit at the start of a key file, and 8 KiB leaves
# room for text before the PEM block, such as the "Bag Attributes" lines
# that `openssl pkcs12 -nodes` writes.
KEY_FILE_HEAD_BYTES = 8 * 1024

# Schemes of the backends that live in this repository's packages/ folder,
# with the distribution to install when a URI names one that is missing.
KNOWN_DISTRIBUTIONS = {
    "tpmkms": "kmsproxy-tpm",
    "yubikey": "kmsproxy-yubikey",
    "pkcs11": "kmsproxy-pkcs11",
    "awskms": "kmsproxy-awskms",
}

# Schemes of step-kms-plugin (which step-kmsproxy-plugin reads) that no
# kmsproxy backend handles, with what to use instead. A user moving over
# types them, and a "did you mean" would point to an unrelated backend.
UNSUPPORTED_GO_SCHEMES = {
    "softkms": "for a key in a file, give its path or file:path=PATH",
    "mackms": "the macOS keychain has no kmsproxy backend",
    "capi": "Windows CryptoAPI has no kmsproxy backend",
    "azurekms": "Azure Key Vault has no kmsproxy backend",
    "cloudkms": "Google Cloud KMS has no kmsproxy backend",
    "sshagentkms": "ssh-agent has no kmsproxy backend",
}

# Minimum difflib similarity ratio for "did you mean" on a scheme: 0.6, the
# difflib default. A typo scores above it (`tpmks` against `tpmkms` 0.91,
# `fiel` against `file` 0.75), and an unrelated scheme such as `vault`
# matches no known one.
SCHEME_SUGGESTION_CUTOFF = 0.6

# Folder of a repository checkout that contains each distribution above.
PACKAGES_FOLDER = "packages"

# Distributions above that depend on another one above. That one must be
# installed first from the checkout, because pip resolves a missing
# dependency by name from a package index, where anyone may own the name.
REQUIRED_FIRST = {"kmsproxy-yubikey": "kmsproxy-pkcs11"}


def install_hint(scheme: str) -> str | None:
    """Return how to install the backend for `scheme`, or None if unknown.

    The distributions are not on any package index, so the hint installs
    from the repository's packages/ folder. A bare `pip install NAME` would
    install whatever someone else uploaded under that name.
    """
    distribution = KNOWN_DISTRIBUTIONS.get(scheme)
    if distribution is None:
        return None
    hint = (
        f"{distribution} provides it; it is on no package index, so install "
        f"it from a checkout of the kmsproxy repository with "
        f"{_install_commands(distribution)}"
    )
    required = REQUIRED_FIRST.get(distribution)
    if required is not None:
        hint += (
            f", after {required} in the same way (else pip fetches "
            f"{required} from a package index)"
        )
    return hint


def _install_commands(distribution: str) -> str:
    """Name the pipx and the pip command that install `distribution`."""
    folder = f"./{PACKAGES_FOLDER}/{distribution}"
    return (
        f"`pipx inject kmsproxy-core {folder}` (pipx) or `pip install {folder}` "
        "(in the environment that runs kmsproxy)"
    )


@dataclass(frozen=True)
class BrokenBackend:
    """An installed backend that failed to load, and why.

    `name` is the entry point's name, which is the URI scheme for the
    backends in this repository.
    """

    name: str
    distribution: str | None
    error: str

    def describe(self) -> str:
        """Name the backend and its error in one line."""
        source = f" ({self.distribution})" if self.distribution else ""
        return f"backend {self.name!r}{source} failed to load: {self.error}"

    def handles(self, scheme: str) -> bool:
        """Return whether this backend would have handled `scheme`."""
        if self.name.lower() == scheme:
            return True
        known = KNOWN_DISTRIBUTIONS.get(scheme)
        return known is not None and known == self.distribution


@dataclass(frozen=True)
class Backend:
    """An installed backend: its plugin name, schemes and distribution."""

    name: str
    schemes: tuple[str, ...]
    distribution: str | None
    plugin: object


class Registry:
    """Installed backends, and the routing of arguments to them."""

    def __init__(
        self,
        plugin_manager: pluggy.PluginManager,
        *,
        broken: Sequence[BrokenBackend] = (),
        distributions: Mapping[str, str] | None = None,
    ) -> None:
        """Collect the schemes of every plugin registered in `plugin_manager`.

        `distributions` maps plugin names to the distribution that provides
        each; `broken` lists the backends that already failed to load.
        """
        self.plugin_manager = plugin_manager
        self.broken = list(broken)
        self.backends = _collect_backends(
            plugin_manager, distributions or {}, self.broken
        )
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
        """Load the `kmsproxy` entry points, plus `plugins` (for tests).

        An entry point that fails to load becomes a `BrokenBackend`.
        """
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        broken: list[BrokenBackend] = []
        distributions: dict[str, str] = {}
        if entry_points:
            broken, distributions = _load_entry_points(manager)
        for plugin in plugins:
            manager.register(plugin)
        return cls(manager, broken=broken, distributions=distributions)

    @property
    def schemes(self) -> list[str]:
        return sorted(self._by_scheme)

    def resolve(self, argument: str) -> KeyURI:
        """Turn an argument into a URI.

        An existing file becomes the URI that a backend claims it with, or
        else `file:path=...`.
        """
        path = Path(argument).expanduser()
        if path.exists():
            claimed = self._claim_key_file(path)
            if claimed is not None:
                return claimed
            return KeyURI(FILE_SCHEME, {"path": argument}, raw=argument)
        if not looks_like_uri(argument):
            # The text may still be a URI with its scheme mistyped, so its
            # secret attributes (a PIN) are hidden as KeyURI.parse does.
            shown = redact_text(argument, hide_bare_parts=False)
            raise UserError(
                f"{shown}: no such file, and not a URI of the form scheme:name=value"
            )
        file_backend.reject_bare_path(argument)
        return KeyURI.parse(argument)

    def _claim_key_file(self, path: Path) -> KeyURI | None:
        """Offer a regular file's head to each backend; return the first claim.

        Each hook runs on its own, as `kmsproxy_add_commands` does, so that
        a backend that raises is skipped instead of hiding every later one.
        """
        head = _read_head(path)
        if head is None:
            return None
        arguments = {"path": path, "head": head}
        hook = self.plugin_manager.hook.kmsproxy_claim_key_file
        # pluggy calls the implementations registered last first, each with
        # only the arguments it declares.
        for implementation in reversed(hook.get_hookimpls()):
            backend = implementation.plugin_name
            try:
                claimed = implementation.function(
                    *(arguments[name] for name in implementation.argnames)
                )
                if claimed is None:
                    continue
                if not isinstance(claimed, str):
                    raise TypeError(f"returned {claimed!r}, expected a URI string")
                uri = KeyURI.parse(claimed)
            except Exception as error:
                # Any exception, because a plugin's hook may run arbitrary code.
                logger.warning(
                    "Key file claim failed backend=%s path=%s error=%s: %s",
                    backend,
                    path,
                    type(error).__name__,
                    error,
                )
                continue
            logger.debug(
                "Key file claimed backend=%s path=%s uri=%s",
                backend,
                path,
                uri.redacted(),
            )
            return uri
        return None

    def backend_for(self, uri: KeyURI) -> Backend:
        backend = self._by_scheme.get(uri.scheme)
        if backend is not None:
            return backend
        for broken in self.broken:
            if broken.handles(uri.scheme):
                raise UserError(
                    f"{uri.redacted()}: {broken.describe()}; repair or reinstall "
                    "it, then check with `kmsproxy backends`"
                )
        installed = ", ".join(self.schemes) or "none"
        message = (
            f"{uri.redacted()}: no installed backend handles the scheme "
            f"{uri.scheme!r} (installed: {installed})"
        )
        if self.broken:
            names = ", ".join(repr(b.name) for b in self.broken)
            message += f"; failed to load: {names}"
        hint = install_hint(uri.scheme)
        if hint is not None:
            message += f"; {hint}"
        else:
            message += self._suggest_scheme(uri.scheme)
        raise UserError(message)

    def _suggest_scheme(self, scheme: str) -> str:
        """Suggest the known scheme closest to a misspelt `scheme`.

        Return the text to append to the error, which points to `kmsproxy
        backends` when no known scheme is close. The candidates are the
        installed schemes and those of every backend in this repository,
        installed or not, so that `tpmks:` suggests `tpmkms:` together with
        the distribution to install.
        """
        unsupported = UNSUPPORTED_GO_SCHEMES.get(scheme)
        if unsupported is not None:
            return f"; step-kms-plugin's {scheme}: is not supported ({unsupported})"
        known = set(self._by_scheme) | set(KNOWN_DISTRIBUTIONS) | {FILE_SCHEME}
        matches = difflib.get_close_matches(
            scheme, sorted(known), n=1, cutoff=SCHEME_SUGGESTION_CUTOFF
        )
        if not matches:
            return "; list the known schemes with `kmsproxy backends`"
        closest = matches[0]
        suggestion = f"; did you mean {closest}:?"
        if closest in self._by_scheme:
            return suggestion
        for broken in self.broken:
            if broken.handles(closest):
                return f"{suggestion} Its {broken.describe()}"
        hint = install_hint(closest)
        if hint is not None:
            return f"{suggestion} It is not installed: {hint}"
        return suggestion

    def open_signer(self, argument: str) -> Signer:
        """Open the private key named by a path or URI.

        This blocks while the backend reaches its device. Async code calls
        it through `anyio.to_thread.run_sync`.
        """
        uri = self.resolve(argument)
        caller = self._caller_for(uri, "kmsproxy_open_signer")
        signer: Signer | None = _call_open_hook(caller, uri)
        if signer is None:
            raise UserError(f"{uri.redacted()}: the backend could not open this key")
        return signer

    def open_certificates(self, argument: str) -> CertificateSource:
        """Open the certificate chain named by a path or URI (blocking)."""
        uri = self.resolve(argument)
        caller = self._caller_for(uri, "kmsproxy_open_certificates")
        source: CertificateSource | None = _call_open_hook(caller, uri)
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


def _call_open_hook(caller: pluggy.HookCaller, uri: KeyURI) -> Any:
    """Call an open hook, turning its `ValueError` into a `UserError`.

    The hook contract allows `ValueError` for a URI the backend cannot use
    (an unknown or malformed attribute). The CLI prints a `UserError` as one
    line, where a bare `ValueError` would print a traceback. `URIError` is
    already a user error and passes through unchanged.
    """
    try:
        return caller(uri=uri)
    except URIError:
        raise
    except ValueError as error:
        text = str(error)
        name = uri.redacted()
        message = text if name in text else f"{name}: {text}"
        raise UserError(message) from error


def _read_head(path: Path) -> bytes | None:
    """Return the first `KEY_FILE_HEAD_BYTES` of a regular file, else None.

    A directory, a FIFO or an unreadable file returns None, and the file
    backend then reports the problem with the path.
    """
    try:
        return read_file_head(path, KEY_FILE_HEAD_BYTES)
    except OSError:
        return None


def _load_entry_points(
    manager: pluggy.PluginManager,
) -> tuple[list[BrokenBackend], dict[str, str]]:
    """Register every `kmsproxy` entry point that loads.

    Return the backends that failed and the distribution of each plugin.
    pluggy's own loader stops at the first entry point that raises, so one
    backend missing a C library would take every backend down with it.
    """
    broken: list[BrokenBackend] = []
    distributions: dict[str, str] = {}
    for entry_point in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
        name = entry_point.name
        if manager.get_plugin(name) is not None or manager.is_blocked(name):
            continue
        distribution = entry_point.dist.name if entry_point.dist else None
        try:
            plugin = entry_point.load()
            manager.register(plugin, name=name)
        except Exception as error:
            # Any exception: a missing module or C library raises ImportError
            # or OSError, but a plugin's import may run arbitrary code.
            broken.append(_broken(name, distribution, error))
            continue
        if distribution is not None:
            distributions[name] = distribution
    return broken, distributions


# Broken backends already logged by this process. The CLI and the proxy
# each load a registry, so without this every failure would be logged twice.
_logged_broken: set[BrokenBackend] = set()


def _broken(name: str, distribution: str | None, error: Exception) -> BrokenBackend:
    """Record a backend that failed to load, and log it once per process."""
    # A loader message may span lines, but the CLI prints errors as one line.
    text = " ".join(f"{type(error).__name__}: {error}".split())
    backend = BrokenBackend(name, distribution, text)
    if backend not in _logged_broken:
        _logged_broken.add(backend)
        logger.warning(
            "Backend failed to load backend=%s distribution=%s error=%s",
            name,
            distribution,
            text,
        )
    return backend


def _collect_backends(
    manager: pluggy.PluginManager,
    distributions: Mapping[str, str],
    broken: list[BrokenBackend],
) -> list[Backend]:
    """Collect each plugin's schemes; move plugins that fail into `broken`."""
    backends: list[Backend] = []
    for implementation in manager.hook.kmsproxy_schemes.get_hookimpls():
        name = implementation.plugin_name
        distribution = distributions.get(name)
        try:
            schemes = implementation.function()
            if not isinstance(schemes, list | tuple):
                raise TypeError(
                    f"kmsproxy_schemes returned {schemes!r}, expected a list of "
                    "scheme names"
                )
        except Exception as error:
            broken.append(_broken(name, distribution, error))
            manager.unregister(implementation.plugin)
            continue
        backends.append(
            Backend(
                name=name,
                schemes=tuple(str(s).lower() for s in schemes),
                distribution=distribution,
                plugin=implementation.plugin,
            )
        )
    backends.sort(key=lambda backend: backend.name)
    return backends
