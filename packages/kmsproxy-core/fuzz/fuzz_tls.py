"""Coverage-guided fuzz target (atheris) for the TLS client and CONNECT parser.

The first input byte picks what the rest is fed to:

0. the record layer, reading plaintext records;
1. the record layer with a read key set, so bytes reach AEAD opening;
2. a started client (after its ClientHello), as raw bytes from the server;
3. the same client, wrapped in one plaintext handshake record, so more
   inputs reach the ServerHello parser than in mode 2;
4. a client that accepted a valid ServerHello, as one handshake message
   protected under the server's handshake key, which reaches the
   EncryptedExtensions, Certificate and CertificateVerify parsers;
5. every `messages.pull_*` decoder of a handshake body;
6. the proxy's CONNECT head parser.

Only the engine's own errors (`TLSError` and its `Alert` subclasses) and the
parser's `RequestError` may escape. Atheris reports any other exception as a
crash, with the input that caused it.

Run it directly (`python fuzz_tls.py -max_total_time=60 [corpus]`), or through
`nox -s fuzz`; the default tests run a short budget.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

# scripted_server and pki live in the tests directory beside this one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

with atheris.instrument_imports():
    from kmsproxy.proxy.connect import HeadParser, RequestError, parse_connect
    from kmsproxy.tls import messages as m
    from kmsproxy.tls.alerts import TLSError
    from kmsproxy.tls.client import ClientConnection
    from kmsproxy.tls.config import TLSClientConfig
    from kmsproxy.tls.key_schedule import SUITES, CipherSuite
    from kmsproxy.tls.records import ContentType, RecordCipher, RecordLayer

from pki import issue, make_ca
from scripted_server import ScriptedServer, plaintext_record

# Bound on records read from one input. An input of a few KiB contains far
# fewer 5-byte record headers than this.
MAX_RECORDS = 10_000

SERVER = issue(make_ca("fuzz CA"), "server", dns_names=("server.test",))
SUITE = SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
READ_SECRET = bytes(SUITE.hash_length)

DECODERS: list[Callable[[bytes], object]] = [
    m.pull_client_hello,
    m.pull_server_hello,
    m.pull_encrypted_extensions,
    m.pull_certificate_request,
    m.pull_certificate,
    m.pull_certificate_verify,
    m.pull_new_session_ticket,
    m.pull_key_update,
    lambda body: m.pull_finished(body, SUITE.hash_length),
]


def drain(layer: RecordLayer) -> None:
    for _ in range(MAX_RECORDS):
        if layer.next_record() is None:
            return


def started_client() -> tuple[ClientConnection, ScriptedServer]:
    client = ClientConnection(TLSClientConfig("server.test"))
    server = ScriptedServer(SERVER)
    client.start()
    server.read_client_hello(client.data_to_send())
    return client, server


def record_layer(data: bytes, protected: bool) -> None:
    layer = RecordLayer()
    if protected:
        layer.read_cipher = RecordCipher(SUITE, READ_SECRET)
    layer.feed(data)
    drain(layer)


def client_raw(data: bytes) -> None:
    client, _ = started_client()
    client.receive_data(data)


def client_handshake_record(data: bytes) -> None:
    client, _ = started_client()
    client.receive_data(plaintext_record(ContentType.handshake, data[: 2**14]))


def client_protected_message(data: bytes) -> None:
    client, server = started_client()
    client.receive_data(server.server_hello())
    client.receive_data(server.protect(ContentType.handshake, data[: 2**14]))


def decoders(data: bytes) -> None:
    if not data:
        return
    decoder = DECODERS[data[0] % len(DECODERS)]
    decoder(data[1:])


def connect_head(data: bytes) -> None:
    head = HeadParser().feed(data)
    if head is not None:
        parse_connect(head)


TARGETS: list[Callable[[bytes], None]] = [
    lambda data: record_layer(data, protected=False),
    lambda data: record_layer(data, protected=True),
    client_raw,
    client_handshake_record,
    client_protected_message,
    decoders,
    connect_head,
]


def test_one_input(data: bytes) -> None:
    """Feed one input to the target its first byte selects."""
    if not data:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    with contextlib.suppress(TLSError, RequestError):
        target(data[1:])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
