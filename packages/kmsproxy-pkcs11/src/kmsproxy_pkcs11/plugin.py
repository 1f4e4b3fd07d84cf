"""Hooks of the kmsproxy-pkcs11 backend: `pkcs11:` URIs and `kmsproxy pkcs11`."""

from __future__ import annotations

import argparse

from kmsproxy.certificates import CertificateSource
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.signer import Signer
from kmsproxy.uri import KeyURI

from . import cli
from .address import SCHEME, parse_key_uri
from .opening import open_certificates, open_signer


@hookimpl
def kmsproxy_schemes() -> list[str]:
    return [SCHEME]


@hookimpl
def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
    if uri.scheme != SCHEME:
        return None
    return open_signer(parse_key_uri(uri))


@hookimpl
def kmsproxy_open_certificates(uri: KeyURI) -> CertificateSource | None:
    if uri.scheme != SCHEME:
        return None
    return open_certificates(parse_key_uri(uri))


@hookimpl
def kmsproxy_add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cli.add_parser(subparsers)
