"""Hooks of the kmsproxy-yubikey backend: `yubikey:` URIs and `kmsproxy yubikey`.

A `yubikey:` URI becomes a PKCS#11 address for ykcs11 (see `address`), and
the kmsproxy-pkcs11 backend opens it, so signing, PIN handling and the
reconnect backoff are the same as for `pkcs11:` URIs.
"""

from __future__ import annotations

import argparse

from kmsproxy.certificates import CertificateSource
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.signer import Signer, SignerError
from kmsproxy.uri import KeyURI
from kmsproxy_pkcs11.address import KeyAddress
from kmsproxy_pkcs11.opening import open_certificates, open_signer
from kmsproxy_pkcs11.token import TokenMissing

from . import cli
from .address import SCHEME, not_found_hint, parse_yubikey_uri


@hookimpl
def kmsproxy_schemes() -> list[str]:
    return [SCHEME]


@hookimpl
def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
    if uri.scheme != SCHEME:
        return None
    address = parse_yubikey_uri(uri)
    try:
        return open_signer(address)
    except TokenMissing as error:
        raise SignerError(no_yubikey_message(address, error)) from None


@hookimpl
def kmsproxy_open_certificates(uri: KeyURI) -> CertificateSource | None:
    if uri.scheme != SCHEME:
        return None
    return open_certificates(parse_yubikey_uri(uri), no_yubikey_message)


@hookimpl
def kmsproxy_add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cli.add_parser(subparsers)


def no_yubikey_message(address: KeyAddress, error: Exception) -> str:
    """Say that no YubiKey was found, why the module thinks so, and what to do."""
    detail = str(error).removeprefix(address.uri).lstrip(": ")
    return f"{address.uri}: no YubiKey found: {detail}; {not_found_hint('serial=')}"
