"""A writer and a reader record layer that share one traffic key, for
TLS 1.3 and TLS 1.2, so tests can frame and open records without a
handshake."""

from __future__ import annotations

from kmsproxy.tls.key_schedule import SUITES, CipherSuite
from kmsproxy.tls.records import RecordCipher, RecordLayer
from kmsproxy.tls.tls12.key_schedule12 import SUITES12, CipherSuite12
from kmsproxy.tls.tls12.records12 import RecordCipher12, RecordLayer12


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
