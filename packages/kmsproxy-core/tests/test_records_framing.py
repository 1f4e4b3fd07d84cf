"""Record framing of the TLS 1.3 and TLS 1.2 record layers when records
arrive at odd boundaries: several per read, split across reads, one byte
at a time."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from record_pairs import tls12_pair, tls13_pair

from kmsproxy.tls.alerts import BadRecordMac
from kmsproxy.tls.key_schedule import SUITES, CipherSuite
from kmsproxy.tls.records import (
    MAX_PLAINTEXT_LENGTH,
    ContentType,
    RecordCipher,
    RecordLayer,
)
from kmsproxy.tls.tls12.key_schedule12 import SUITES12, CipherSuite12
from kmsproxy.tls.tls12.records12 import RecordCipher12, RecordLayer12

Layer = RecordLayer | RecordLayer12
PairFactory = Callable[[], tuple[Layer, Layer]]

# Read sizes that cut records anywhere: inside a header, one byte past it,
# inside a body and across several records.
ODD_READ_SIZES = (1, 3, 5, 6, 4099, 16389, 70001)

# Application data of three full records and a short fourth, with no byte
# repeating within a record, so a record delivered twice or out of order
# changes the joined result.
MESSAGE = bytes(itertools.islice(itertools.cycle(range(251)), 3 * 2**14 + 777))


PAIRS = [pytest.param(tls13_pair, id="tls13"), pytest.param(tls12_pair, id="tls12")]


def drain(reader: Layer) -> list[bytes]:
    contents = []
    while (record := reader.next_record()) is not None:
        content_type, content = record
        assert content_type == ContentType.application_data
        contents.append(content)
    return contents


@pytest.mark.parametrize("make_pair", PAIRS)
@pytest.mark.parametrize("read_size", ODD_READ_SIZES)
def test_records_at_odd_boundaries(make_pair: PairFactory, read_size: int) -> None:
    writer, reader = make_pair()
    wire = writer.encode(ContentType.application_data, MESSAGE)
    contents = []
    for start in range(0, len(wire), read_size):
        reader.feed(wire[start : start + read_size])
        contents += drain(reader)
    assert [len(content) for content in contents] == [2**14, 2**14, 2**14, 777]
    assert b"".join(contents) == MESSAGE
    assert reader.take_buffered() == b""


@pytest.mark.parametrize("make_pair", PAIRS)
def test_record_split_across_reads(make_pair: PairFactory) -> None:
    writer, reader = make_pair()
    record = writer.encode(ContentType.application_data, b"one record")
    for byte in range(len(record) - 1):
        reader.feed(record[byte : byte + 1])
        assert reader.next_record() is None, f"record returned after {byte + 1} bytes"
    reader.feed(record[-1:])
    assert reader.next_record() == (ContentType.application_data, b"one record")


@pytest.mark.parametrize("make_pair", PAIRS)
def test_feed_after_partial_drain(make_pair: PairFactory) -> None:
    # Decrypting reads the receive buffer through a view. Feeding more
    # bytes, which grows or compacts the buffer, must work after it.
    writer, reader = make_pair()
    first = writer.encode(ContentType.application_data, MESSAGE)
    second = writer.encode(ContentType.application_data, b"tail")
    reader.feed(first + second[:7])
    contents = drain(reader)
    reader.feed(second[7:])
    contents += drain(reader)
    assert b"".join(contents) == MESSAGE + b"tail"


@pytest.mark.parametrize("make_pair", PAIRS)
def test_encode_splits_at_maximum(make_pair: PairFactory) -> None:
    writer, reader = make_pair()
    reader.feed(writer.encode(ContentType.application_data, bytes(2 * 2**14 + 1)))
    lengths = [len(content) for content in drain(reader)]
    assert lengths == [MAX_PLAINTEXT_LENGTH, MAX_PLAINTEXT_LENGTH, 1]


@pytest.mark.parametrize("make_pair", PAIRS)
def test_tampered_record_in_batch(make_pair: PairFactory) -> None:
    writer, reader = make_pair()
    wire = bytearray(writer.encode(ContentType.application_data, MESSAGE))
    # Flip a byte inside the second record's body.
    wire[2**14 + 200] ^= 1
    reader.feed(bytes(wire))
    assert reader.next_record() == (ContentType.application_data, MESSAGE[: 2**14])
    with pytest.raises(BadRecordMac):
        reader.next_record()


def test_seal_matches_encode() -> None:
    suite = SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
    sealed = RecordCipher(suite, bytes(32)).seal(ContentType.application_data, b"x")
    layer = RecordLayer()
    layer.write_cipher = RecordCipher(suite, bytes(32))
    assert layer.encode(ContentType.application_data, b"x") == sealed


def test_seal12_matches_encode() -> None:
    suite = SUITES12[CipherSuite12.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    sealed = RecordCipher12(suite, bytes(16), bytes(4)).seal(
        ContentType.application_data, b"x"
    )
    layer = RecordLayer12()
    layer.write_cipher = RecordCipher12(suite, bytes(16), bytes(4))
    assert layer.encode(ContentType.application_data, b"x") == sealed
