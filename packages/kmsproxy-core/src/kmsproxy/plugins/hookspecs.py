"""The backend author's manual: every hook a kmsproxy backend can implement.

A backend is a distribution that declares an entry point in the group
`kmsproxy`, for example in its `pyproject.toml`::

    [project.entry-points.kmsproxy]
    tpm = "kmsproxy_tpm.plugin"

The entry point names a plain module (or object) with functions decorated by
`kmsproxy.hookimpl`. kmsproxy loads every such entry point at start
through pluggy. The built-in file backend (`kmsproxy.plugins.file`) is
registered the same way and is a short, complete example.

How an argument reaches a backend: a `--clientkey`, `--clientcert`, CA key or
CA certificate argument that names an existing file is first offered to
`kmsproxy_claim_key_file`, so a backend can take a key file in its own
format (a TSS2 PRIVATE KEY file goes to the TPM backend). A file that no
backend claims goes to the file backend. Anything else is parsed as a
`KeyURI` (`scheme:name=value;...`), and the backend that lists that scheme
in `kmsproxy_schemes` receives it.

`kmsproxy_open_signer`, `kmsproxy_open_certificates` and
`kmsproxy_claim_key_file` may block (open a device, log in, call a cloud
API): `Proxy`, `kmsproxy csr` and `kmsproxy init --key` call them in a
worker thread, and a backend command may call them with no event loop
running. So they must not need a running event loop
(`anyio.lowlevel.current_token()` fails there), though they may create an
`anyio.CapacityLimiter`. They run outside that limiter, so a backend whose
device cannot overlap an open with a signature must take its own device
lock. The other hooks are called from the main or event loop thread and must
not block. A `Signer.sign`
that blocks must run in a worker thread (derive from
`kmsproxy.signer.BlockingSigner`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kmsproxy.certificates import CertificateSource
    from kmsproxy.signer import Signer
    from kmsproxy.uri import KeyURI

PROJECT_NAME = "kmsproxy"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def kmsproxy_schemes() -> list[str]:
    """Return the URI schemes this backend handles, e.g. `["tpmkms"]`.

    Called once when the registry loads. Every backend's list is collected;
    two backends claiming one scheme is a startup error naming both.
    The file backend returns `["file"]` and also receives the existing files
    that no backend claims (see `kmsproxy_claim_key_file`).
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def kmsproxy_claim_key_file(path: Path, head: bytes) -> str | None:
    """Return the URI that opens the key file `path`, or None if not yours.

    Called for each argument that names an existing regular file, before the
    file backend receives it. `head` is the start of the file, at most
    `kmsproxy.plugins.registry.KEY_FILE_HEAD_BYTES` bytes, which the
    registry reads once for every backend. Decide from `head` alone, without
    reading the file again or blocking.

    Return a URI with one of your schemes and the path percent-encoded
    (`urllib.parse.quote`), for example `tpmkms:path=/home/me/client.pem`.
    It is then opened as if the user had given that URI: by
    `kmsproxy_open_signer` for a key argument and by
    `kmsproxy_open_certificates` for a certificate argument.

    The first non-None result wins. A hook that raises or returns a URI that
    does not parse is logged as a WARNING and skipped, so a faulty backend
    cannot take plain key files down with it.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
    """Open the private key named by `uri` and return a `Signer`.

    Called for a URI whose scheme this backend listed. Return None when the
    URI is not yours (the next backend is asked); raise `SignerError` or
    `ValueError` with a message naming `uri.redacted()` and what to do when
    the key cannot be opened. The first non-None result wins.

    Read secrets (`pin-value`, `pin-source`) from the URI, never log them,
    and keep them out of exception messages.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def kmsproxy_open_certificates(uri: KeyURI) -> CertificateSource | None:
    """Return a `CertificateSource` for the chain named by `uri`.

    Same contract as `kmsproxy_open_signer`. Backends whose store keeps
    certificates beside keys (a PIV slot, a TPM key's directory) implement
    this so one URI serves for both `--clientkey` and `--clientcert`.
    """
    raise NotImplementedError


@hookspec
def kmsproxy_add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add backend commands under the `kmsproxy` CLI (`kmsproxy tpm ...`).

    Called once while the CLI builds its parser. Add a parser with
    `subparsers.add_parser(name, help=...)` and set its `handler` default to
    a callable taking the parsed `argparse.Namespace` and returning an exit
    code. Raise `kmsproxy.errors.UserError` for a user error: the CLI prints
    its message as one line, with no traceback.
    """
    raise NotImplementedError
