"""Strict readers and writers for the TLS presentation language.

Every read checks the bytes that remain, and every vector's length against
the bounds the RFC declares for it (`opaque x<min..max>`). A violation raises
`DecodeError`, so no decoder built on `Reader` can leak an IndexError or a
struct.error for malformed input.
"""

from __future__ import annotations

from .alerts import DecodeError


class Reader:
    """A cursor over received bytes that raises `DecodeError` on any overrun."""

    def __init__(self, data: bytes, label: str = "message") -> None:
        self._data = data
        self._position = 0
        self.label = label

    @property
    def remaining(self) -> int:
        return len(self._data) - self._position

    def at_end(self) -> bool:
        return self._position == len(self._data)

    def expect_end(self) -> None:
        """Raise `DecodeError` if unread bytes remain."""
        if not self.at_end():
            raise DecodeError(f"{self.remaining} trailing bytes after {self.label}")

    def read_bytes(self, length: int) -> bytes:
        if length > self.remaining:
            raise DecodeError(
                f"{self.label} truncated: need {length} bytes, {self.remaining} left"
            )
        start = self._position
        self._position += length
        return self._data[start : self._position]

    def read_uint(self, size: int) -> int:
        return int.from_bytes(self.read_bytes(size), "big")

    def read_uint8(self) -> int:
        return self.read_uint(1)

    def read_uint16(self) -> int:
        return self.read_uint(2)

    def read_uint24(self) -> int:
        return self.read_uint(3)

    def read_vector(self, length_size: int, minimum: int, maximum: int) -> bytes:
        """Read `opaque x<minimum..maximum>` with a `length_size`-byte prefix."""
        length = self.read_uint(length_size)
        if length < minimum or length > maximum:
            raise DecodeError(
                f"{self.label}: vector length {length} outside {minimum}..{maximum}"
            )
        return self.read_bytes(length)

    def read_sub(
        self, length_size: int, minimum: int, maximum: int, label: str
    ) -> Reader:
        """Read a vector and return a `Reader` over its contents."""
        return Reader(self.read_vector(length_size, minimum, maximum), label)

    def read_uint16_list(self, minimum: int, maximum: int, label: str) -> list[int]:
        """Read `uint16 x<minimum..maximum>` (the bounds count bytes)."""
        items = self.read_sub(2, minimum, maximum, label)
        if items.remaining % 2:
            raise DecodeError(f"{label}: odd byte length {items.remaining}")
        values = []
        while not items.at_end():
            values.append(items.read_uint16())
        return values


def encode_uint(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def encode_vector(data: bytes, length_size: int, minimum: int, maximum: int) -> bytes:
    """Encode `opaque x<minimum..maximum>`; a length outside raises ValueError.

    Only this side's own values reach here, so an error is a programming
    mistake, not a protocol violation.
    """
    if not minimum <= len(data) <= maximum:
        raise ValueError(f"vector length {len(data)} outside {minimum}..{maximum}")
    return len(data).to_bytes(length_size, "big") + data


def encode_uint16_list(values: list[int], minimum: int, maximum: int) -> bytes:
    body = b"".join(v.to_bytes(2, "big") for v in values)
    return encode_vector(body, 2, minimum, maximum)
