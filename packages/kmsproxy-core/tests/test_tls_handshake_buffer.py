"""Splitting handshake messages out of the reassembly buffer."""

from __future__ import annotations

import pytest

from kmsproxy.tls import messages as m
from kmsproxy.tls.alerts import DecodeError


def test_short_header_waits() -> None:
    buffer = bytearray(b"\x02\x00\x00")
    assert m.pop_handshake_message(buffer) is None
    assert buffer == b"\x02\x00\x00"


def test_partial_body_waits() -> None:
    buffer = bytearray(b"\x14\x00\x00\x04ab")
    assert m.pop_handshake_message(buffer) is None
    assert buffer == b"\x14\x00\x00\x04ab"


def test_whole_message_removed() -> None:
    buffer = bytearray(b"\x14\x00\x00\x02ab\x0b\x00")
    assert m.pop_handshake_message(buffer) == b"\x14\x00\x00\x02ab"
    assert buffer == b"\x0b\x00"


def test_limit_is_inclusive() -> None:
    length = m.MAX_HANDSHAKE_MESSAGE_LENGTH
    buffer = bytearray(b"\x0b" + length.to_bytes(3, "big") + bytes(length))
    message = m.pop_handshake_message(buffer)
    assert message is not None
    assert len(message) == m.HANDSHAKE_HEADER_LENGTH + length


def test_oversized_length_rejected() -> None:
    length = m.MAX_HANDSHAKE_MESSAGE_LENGTH + 1
    buffer = bytearray(b"\x0b" + length.to_bytes(3, "big"))
    with pytest.raises(DecodeError, match="exceeds the"):
        m.pop_handshake_message(buffer)
