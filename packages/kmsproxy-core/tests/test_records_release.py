"""The record layers' receive buffer after a record fails to decrypt.

Both layers decrypt through views into their receive buffer. A view that
stayed alive on the error path, for example in the exception's traceback,
would keep the buffer exported, and the next resize would raise
BufferError instead of framing records.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kmsproxy.tls.alerts import BadRecordMac
from kmsproxy.tls.key_schedule import SUITES, CipherSuite
from kmsproxy.tls.records import ContentType, RecordCipher, RecordLayer
from kmsproxy.tls.tls12.key_schedule12 import SUITES12, CipherSuite12
from kmsproxy.tls.tls12.records12 import RecordCipher12, RecordLayer12

Layer = RecordLayer | RecordLayer12
PairFactory = Callable[[], tuple[Layer, Layer]]

MESSAGE = bytes(range(200))


def tls13_pair() -> tuple[RecordLayer, RecordLayer]:
    suite = SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
    secret = bytes(range(32))
    writer, reader = RecordLayer(), RecordLayer()
    writer.write_cipher = RecordCipher(suite, secret)
    reader.read_cipher = RecordCipher(suite, secret)
    return writer, reader


def tls12_pair() -> tuple[RecordLayer12, RecordLayer12]:
    suite = SUITES12[CipherSuite12.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    writer, reader = RecordLayer12(), RecordLayer12()
    writer.write_cipher = RecordCipher12(suite, bytes(16), bytes(4))
    reader.read_cipher = RecordCipher12(suite, bytes(16), bytes(4))
    return writer, reader


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
