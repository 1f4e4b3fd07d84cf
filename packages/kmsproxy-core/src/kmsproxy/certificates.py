"""The `CertificateSource` interface: where a certificate chain comes from."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509


class CertificateError(Exception):
    """A certificate chain could not be loaded; the message names the source."""


class CertificateSource(abc.ABC):
    """A certificate chain, leaf first, that may change over time.

    The proxy calls `load` at startup and on every reload trigger (a change
    to one of `watch_paths`, SIGHUP, or the earliest expiry passing).
    """

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The source's URI or path, with secrets redacted."""

    @abc.abstractmethod
    async def load(self) -> list[x509.Certificate]:
        """Read the chain, leaf first. Raise `CertificateError` on failure."""

    def watch_paths(self) -> Sequence[Path]:
        """Files whose change means the chain changed; empty if none."""
        return ()
