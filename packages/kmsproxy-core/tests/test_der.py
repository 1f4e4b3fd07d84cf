"""The DER helpers that assemble certificates and certificate requests."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from pki import make_ca

from kmsproxy import der


@pytest.mark.parametrize("length", [0, 1, 127, 128, 255, 256, 65535, 65536])
def test_length_round_trip(length: int) -> None:
    encoded = der.encode_sequence(b"\x00" * length)
    tag, start, end = der.read_header(encoded, 0)
    assert tag == der.TAG_SEQUENCE
    assert end - start == length
    assert end == len(encoded)


def test_short_form_below_128() -> None:
    assert der.encode_length(127) == b"\x7f"
    assert der.encode_length(128) == b"\x81\x80"
    assert der.encode_length(256) == b"\x82\x01\x00"


def test_bit_string_has_no_unused_bits() -> None:
    assert der.encode_bit_string(b"\xab") == b"\x03\x02\x00\xab"


def test_certificate_split_and_reassembled() -> None:
    certificate = make_ca().cert.public_bytes(serialization.Encoding.DER)
    to_be_signed, algorithm, signature = der.sequence_elements(certificate)
    assert algorithm == der.signature_algorithm(certificate)
    # The signature element is a BIT STRING with no unused bits.
    _, start, _ = der.read_header(signature, 0)
    value = signature[start + 1 :]
    assert der.assemble_signed(to_be_signed, algorithm, value) == certificate


@pytest.mark.parametrize(
    "data",
    [b"", b"\x30", b"\x30\x05\x00", b"\x30\x85\x00\x00\x00\x00\x01", b"\x30\x80"],
)
def test_truncated_or_unsupported_rejected(data: bytes) -> None:
    with pytest.raises(ValueError, match="DER"):
        der.read_header(data, 0)


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(ValueError, match="not a single DER SEQUENCE"):
        der.sequence_elements(der.encode_sequence(b"") + b"\x00")


def test_unsigned_structure_rejected() -> None:
    two_elements = der.encode_sequence(der.encode_sequence(b"") * 2)
    with pytest.raises(ValueError, match="three elements"):
        der.signature_algorithm(two_elements)
