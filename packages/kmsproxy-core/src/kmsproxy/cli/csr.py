"""`kmsproxy csr`: a PKCS#10 certificate request signed by any backend's key.

The key never leaves its store, so `cryptography`'s CSR builder cannot sign
with it. `ca.sign_through_signer` builds the request as `LocalCA.sign`
builds a certificate: a throwaway key of the same algorithm encodes the
subject, the extensionRequest attribute and the signatureAlgorithm (RFC 2986
section 4). Here the throwaway key's subjectPKInfo in the
CertificationRequestInfo is replaced with the `Signer`'s public key before
the `Signer` signs it, and the CertificationRequest is assembled around that
signature (section 4.2).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import urllib.parse
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import anyio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from kmsproxy import der
from kmsproxy.ca import (
    SIGNING_KEY_USAGE,
    choose_ca_scheme,
    dns_name_for_san,
    sign_through_signer,
)
from kmsproxy.cli.keys import open_signer_within
from kmsproxy.errors import UserError
from kmsproxy.plugins.registry import Registry
from kmsproxy.signer import Signer, SignerError

# Maximum seconds the key may take to sign the request. A hardware key can
# wait for a touch or a PIN, so this leaves a person time to act, and a hung
# device still ends the command with an error.
CSR_SIGN_TIMEOUT_SECONDS = 120.0

# Prefixes of `--san` values that are not DNS names or IP addresses.
SAN_PREFIX_DNS = "dns:"
SAN_PREFIX_IP = "ip:"
SAN_PREFIX_EMAIL = "email:"
SAN_PREFIX_URI = "uri:"

SAN_SYNTAX = "NAME, IP, dns:NAME, ip:IP, email:ADDRESS or uri:URI"

_DER = serialization.Encoding.DER


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "csr",
        help="write a certificate signing request (PKCS#10) for a key",
        description=(
            "Write a PEM certificate signing request for a client certificate "
            "(clientAuth), signed by KEY, which may be a file or a key URI of "
            "any installed backend."
        ),
    )
    parser.add_argument("key", metavar="KEY", help="private key: a file or key URI")
    parser.add_argument(
        "--subject",
        required=True,
        metavar="DN",
        help="subject name as an RFC 4514 string, e.g. 'CN=me,O=Example'",
    )
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "subject alternative name, repeatable: a DNS name or IP address, "
            "or one prefixed with dns:, ip:, email: or uri:"
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the PEM request to FILE instead of standard output",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing --out file"
    )
    parser.set_defaults(handler=run)


def parse_subject(text: str) -> x509.Name:
    """Parse an RFC 4514 distinguished name; raise `UserError` if invalid."""
    try:
        name = x509.Name.from_rfc4514_string(text)
        # Encoding catches values that parse but cannot be encoded, such as
        # a country name longer than two letters.
        name.public_bytes()
    except ValueError as error:
        # cryptography 44 raises an empty ValueError for an unknown type.
        reason = str(error) or "unknown attribute type"
        raise UserError(
            f"--subject {text!r}: invalid RFC 4514 name ({reason}); write it "
            "like 'CN=me,O=Example'"
        ) from None
    for attribute in name:
        value = attribute.value
        if isinstance(value, str) and not value.isprintable():
            raise UserError(
                f"--subject {text!r}: the value of {attribute.rfc4514_string()!r} "
                "contains a control character; remove it"
            )
    return name


def parse_san(text: str) -> x509.GeneralName:
    """Parse one `--san` value (see `SAN_SYNTAX`); raise `UserError` if invalid.

    A value without a prefix is an IP address when it parses as one, and
    otherwise a DNS name.
    """
    lowered = text.lower()
    if lowered.startswith(SAN_PREFIX_EMAIL):
        return _email_name(text, text[len(SAN_PREFIX_EMAIL) :])
    if lowered.startswith(SAN_PREFIX_URI):
        return _uri_name(text, text[len(SAN_PREFIX_URI) :])
    if lowered.startswith(SAN_PREFIX_IP):
        address = text[len(SAN_PREFIX_IP) :]
        try:
            return _ip_name(text, ipaddress.ip_address(address))
        except ValueError:
            raise UserError(
                f"--san {text!r}: {address!r} is not an IPv4 or IPv6 address"
            ) from None
    if lowered.startswith(SAN_PREFIX_DNS):
        return _dns_name(text, text[len(SAN_PREFIX_DNS) :])
    try:
        return _ip_name(text, ipaddress.ip_address(text))
    except ValueError:
        pass
    if _DOTTED_DIGITS.fullmatch(text):
        # Python 3.11 rejects leading zeros, which some tools read as octal.
        raise UserError(
            f"--san {text!r}: ambiguous IPv4 address (a part has a leading "
            "zero, which some tools read as octal); write it without"
        )
    if "@" in text:
        raise UserError(
            f"--san {text!r}: not a DNS name; write email:{text} for an e-mail address"
        )
    if "://" in text:
        raise UserError(f"--san {text!r}: not a DNS name; write uri:{text} for a URI")
    return _dns_name(text, text)


# Four dot-separated decimal numbers: an IPv4 address, even where
# `ipaddress` rejects it.
_DOTTED_DIGITS = re.compile(r"[0-9]+(\.[0-9]+){3}")


def _ip_name(text: str, address: IPv4Address | IPv6Address) -> x509.IPAddress:
    """Wrap `address`, rejecting an IPv6 zone, which X.509 cannot encode."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise UserError(
            f"--san {text!r}: an IPv6 zone (%{address.scope_id}) cannot be in a "
            "certificate; drop it"
        )
    return x509.IPAddress(address)


def _is_ia5_text(text: str) -> bool:
    """Tell whether `text` is printable ASCII without spaces (IA5String)."""
    return all("!" <= char <= "~" for char in text)


def _dns_name(text: str, name: str) -> x509.DNSName:
    encoded = dns_name_for_san(name)
    if encoded is None:
        raise UserError(
            f"--san {text!r}: invalid DNS name; give letters, digits, '-' and "
            f"'.' only, or one of {SAN_SYNTAX}"
        )
    return x509.DNSName(encoded)


def _email_name(text: str, address: str) -> x509.RFC822Name:
    local_part, at, domain = address.rpartition("@")
    # RFC 5280 section 4.2.1.6: an rfc822Name is an IA5String Mailbox.
    valid_local = bool(local_part) and _is_ia5_text(local_part)
    if not at or not valid_local or dns_name_for_san(domain) is None:
        raise UserError(
            f"--san {text!r}: invalid e-mail address; write it like "
            "email:me@example.com"
        )
    return x509.RFC822Name(address)


def _uri_name(text: str, uri: str) -> x509.UniformResourceIdentifier:
    parsed = urllib.parse.urlsplit(uri)
    # RFC 5280 section 4.2.1.6: a URI SAN is absolute, in an IA5String.
    if not parsed.scheme or not _is_ia5_text(uri):
        raise UserError(
            f"--san {text!r}: invalid URI; write an absolute URI like "
            "uri:spiffe://example.org/workload"
        )
    return x509.UniformResourceIdentifier(uri)


def request_builder(
    subject: x509.Name, names: Sequence[x509.GeneralName]
) -> x509.CertificateSigningRequestBuilder:
    """Build the request for a TLS client certificate with `names` as SANs.

    Raise `UserError` when the request would have neither subject nor SAN.
    """
    if not subject and not names:
        raise UserError(
            "the request has no subject and no SAN: give a non-empty --subject "
            "or a --san"
        )
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(
            SIGNING_KEY_USAGE,
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if names:
        # RFC 5280 section 4.2.1.6: with an empty subject, the SAN extension
        # must be critical.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(dict.fromkeys(names))),
            critical=not subject,
        )
    return builder


async def sign_request(
    builder: x509.CertificateSigningRequestBuilder, signer: Signer
) -> x509.CertificateSigningRequest:
    """Sign `builder`'s request over `signer`'s public key, through `signer`.

    Raise `SignerError` when the signer fails, times out, or returns a
    signature that does not verify.
    """
    scheme = choose_ca_scheme(signer, role="key")
    public_key_info = signer.public_key().public_bytes(
        _DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def use_signer_key(request_info: bytes) -> bytes:
        # CertificationRequestInfo is SEQUENCE { version, subject,
        # subjectPKInfo, attributes }; put the signer's key in subjectPKInfo.
        info = der.sequence_elements(request_info)
        info[2] = public_key_info
        return der.encode_sequence(b"".join(info))

    signed = await sign_through_signer(
        builder,
        signer,
        scheme,
        timeout_seconds=CSR_SIGN_TIMEOUT_SECONDS,
        role="the key",
        rewrite=use_signer_key,
    )
    request = x509.load_der_x509_csr(signed)
    if not request.is_signature_valid:
        raise SignerError(
            f"{signer.uri}: the key produced a {scheme.name} signature that does "
            "not verify against its own public key"
        )
    return request


async def create_request(
    registry: Registry,
    key: str,
    subject: x509.Name,
    names: Sequence[x509.GeneralName],
) -> x509.CertificateSigningRequest:
    """Open `key` through `registry`, sign the request with it, close it.

    Raise `SignerError` when the key does not open within
    `KEY_OPEN_TIMEOUT_SECONDS` or cannot sign.
    """
    builder = request_builder(subject, names)
    signer = await open_signer_within(registry, key)
    try:
        return await sign_request(builder, signer)
    finally:
        await signer.aclose()


def write_output(path: Path, data: bytes, *, force: bool) -> None:
    """Write `data` to `path`; raise `UserError` if it exists and not `force`."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        # A request contains no secret, so it gets the usual 0644 mode.
        descriptor = os.open(path, flags, 0o644)
    except FileExistsError:
        raise UserError(
            f"{path} already exists; pass --force to overwrite it"
        ) from None
    except OSError as error:
        raise UserError(
            f"{path}: cannot write the request: {error.strerror or error}"
        ) from None
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def run(args: argparse.Namespace) -> int:
    subject = parse_subject(args.subject)
    names = [parse_san(text) for text in args.san]
    if args.out is not None and args.out.exists() and not args.force:
        # Checked before the key signs, so no touch or PIN is wasted.
        raise UserError(f"{args.out} already exists; pass --force to overwrite it")
    registry = Registry.load()
    request = anyio.run(create_request, registry, args.key, subject, names)
    pem = request.public_bytes(serialization.Encoding.PEM)
    if args.out is None:
        sys.stdout.write(pem.decode("ascii"))
    else:
        write_output(args.out, pem, force=args.force)
    return 0
