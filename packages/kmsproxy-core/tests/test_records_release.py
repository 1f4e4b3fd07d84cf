"""The record layers' receive buffer after a record fails to decrypt.

Both layers decrypt through views into their receive buffer. A view that
stayed alive on the error path, for example in the exception's traceback,
would keep the buffer exported, and the next resize would raise
BufferError instead of framing records.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from record_pairs import tls12_pair, tls13_pair

from kmsproxy.tls.alerts import BadRecordMac
from kmsproxy.tls.records import ContentType, RecordLayer
from kmsproxy.tls.tls12.records12 import RecordLayer12

Layer = RecordLayer | RecordLayer12
PairFactory = Callable[[], tuple[Layer, Layer]]

MESSAGE = bytes(range(200))


def tampered_record(writer: Layer) -> bytes:
    """Return one application data record with its last tag byte flipped."""
    record = bytearray(writer.encode(ContentType.application_data, MESSAGE))
    record[-1] ^= 1
    return bytes(record)


@pytest.mark.parametrize("make_pair", [tls13_pair, tls12_pair], ids=["tls13", "tls12"])
def test_buffer_resizes_after_bad_mac(make_pair: PairFactory) -> None:
    writer, reader = make_pair()
    tampered = tampered_record(writer)
    reader.feed(tampered)
    # pytest keeps the exception, and with it the traceback's frames, alive.
    with pytest.raises(BadRecordMac) as caught:
        reader.next_record()
    assert caught.value is not None
    # A resize raises BufferError while any view into the buffer is alive.
    reader.feed(b"\x17\x03\x03")
    # The failed record stays unconsumed, and the new bytes follow it.
    assert reader.take_buffered() == tampered + b"\x17\x03\x03"
