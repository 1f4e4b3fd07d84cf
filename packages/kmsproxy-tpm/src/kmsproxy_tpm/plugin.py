"""Hooks of the kmsproxy-tpm backend: `tpmkms:` keys, chains and commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import quote

from kmsproxy.certificates import CertificateSource
from kmsproxy.plugins.hookspecs import hookimpl
from kmsproxy.signer import Signer, SignerError
from kmsproxy.uri import KeyURI
from kmsproxy_tpm import commands
from kmsproxy_tpm.certificates import TPMChainSource
from kmsproxy_tpm.keyblob import PEM_LABEL
from kmsproxy_tpm.reference import SCHEME, parse_reference
from kmsproxy_tpm.signer import TPMSigner


@hookimpl
def kmsproxy_schemes() -> list[str]:
    return [SCHEME]


@hookimpl
def kmsproxy_claim_key_file(path: Path, head: bytes) -> str | None:
    """Claim a TSS2 PRIVATE KEY PEM file given by path, as `tpmkms:path=`.

    The TPM comes from `$KMSPROXY_TPM_TCTI`, else `/dev/tpmrm0`, because a
    bare path has no place for `tcti=`.
    """
    if PEM_LABEL not in head:
        return None
    return f"{SCHEME}:path={quote(str(path))}"


@hookimpl
def kmsproxy_open_signer(uri: KeyURI) -> Signer | None:
    if uri.scheme != SCHEME:
        return None
    return TPMSigner.open(parse_reference(uri))


@hookimpl
def kmsproxy_open_certificates(uri: KeyURI) -> CertificateSource | None:
    if uri.scheme != SCHEME:
        return None
    try:
        reference = parse_reference(uri)
    except SignerError as error:
        raise ValueError(str(error)) from None
    return TPMChainSource(reference)


@hookimpl
def kmsproxy_add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    commands.add_parser(subparsers)
