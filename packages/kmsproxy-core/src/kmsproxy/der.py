"""A minimal DER reader and writer (X.690) for signed X.509 structures.

`cryptography` builds and signs certificates and CSRs only with its own
private key types. A key held by a `Signer` signs the to-be-signed bytes
instead, and this module puts the signed structure together: a Certificate
(RFC 5280 section 4.1) or a CertificationRequest (RFC 2986 section 4.2).
Both are `SEQUENCE { toBeSigned, signatureAlgorithm, signature BIT STRING }`.
It reads only definite lengths of up to 4 bytes, which covers every
structure that kmsproxy builds.
"""

from __future__ import annotations

TAG_SEQUENCE = 0x30
TAG_BIT_STRING = 0x03

# Length bytes after the 0x8N prefix that the reader accepts: 4 bytes allow
# up to 4 GiB, far beyond any certificate or CSR.
MAX_LENGTH_BYTES = 4


def encode_length(length: int) -> bytes:
    """Encode a definite length, short form below 128 (X.690 section 8.1.3)."""
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def encode_sequence(content: bytes) -> bytes:
    """Wrap already encoded elements in a SEQUENCE."""
    return bytes([TAG_SEQUENCE]) + encode_length(len(content)) + content


def encode_bit_string(data: bytes) -> bytes:
    """Encode whole bytes as a BIT STRING, such as a signature value."""
    # The leading 0x00 is the count of unused bits in the last byte.
    content = b"\x00" + data
    return bytes([TAG_BIT_STRING]) + encode_length(len(content)) + content


def read_header(data: bytes, offset: int) -> tuple[int, int, int]:
    """Read one TLV header at `offset`; return (tag, content start, end).

    Raise `ValueError` for a truncated element or an unsupported length.
    """
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[offset]
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > MAX_LENGTH_BYTES or start + count > len(data):
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, start, end


def sequence_elements(data: bytes) -> list[bytes]:
    """Split a DER SEQUENCE into its encoded elements, headers included.

    Raise `ValueError` when `data` is not exactly one SEQUENCE.
    """
    tag, start, end = read_header(data, 0)
    if tag != TAG_SEQUENCE or end != len(data):
        raise ValueError("not a single DER SEQUENCE")
    elements: list[bytes] = []
    offset = start
    while offset < end:
        _, _, element_end = read_header(data, offset)
        elements.append(data[offset:element_end])
        offset = element_end
    return elements


def signature_algorithm(signed_der: bytes) -> bytes:
    """Return the encoded signatureAlgorithm of a signed structure.

    That is the second element of a Certificate or a CertificationRequest.
    """
    elements = sequence_elements(signed_der)
    if len(elements) != 3:
        raise ValueError("not a signed DER structure of three elements")
    return elements[1]


def assemble_signed(to_be_signed: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """Assemble `SEQUENCE { to_be_signed, algorithm, BIT STRING signature }`."""
    return encode_sequence(to_be_signed + algorithm + encode_bit_string(signature))
