"""Batched delivery in the TLS 1.2 client: consecutive application data
records in one read become one `ApplicationData` event, while every record
is still checked on its own and whatever sits between them keeps its place.
"""

from __future__ import annotations

import itertools

import pytest
from pki import issue, make_ca
from scripted_server12 import ScriptedServer12
from test_tls12_client import handshake
from tls_harness import events

from kmsproxy.tls import alerts
from kmsproxy.tls.alerts import AlertDescription
from kmsproxy.tls.config import TLSClientConfig
from kmsproxy.tls.events import ApplicationData, CloseNotifyReceived
from kmsproxy.tls.records import MAX_PLAINTEXT_LENGTH, ContentType
from kmsproxy.tls.tls12.client12 import (
    MAX_CONSECUTIVE_EMPTY_RECORDS,
    ClientConnection12,
    State12,
)
from kmsproxy.tls.tls12.key_schedule12 import CipherSuite12

CA = make_ca()
SERVER = issue(CA, "server", dns_names=("server.test",))

# Records per read in the batch tests: as many full records as the stream
# reads from the transport at once.
RECORDS_PER_READ = 16

CLOSE_NOTIFY = bytes([1, AlertDescription.close_notify])
HANDSHAKE_FAILURE = bytes([2, AlertDescription.handshake_failure])
UNRECOGNIZED_NAME = bytes([1, AlertDescription.unrecognized_name])


def record_contents(count: int) -> list[bytes]:
    """Return `count` full-size contents that differ from each other, so a
    record lost, repeated or reordered changes the joined result."""
    pattern = itertools.cycle(range(251))
    return [
        bytes(itertools.islice(pattern, MAX_PLAINTEXT_LENGTH)) for _ in range(count)
    ]


def connected() -> tuple[ClientConnection12, ScriptedServer12]:
    client = ClientConnection12(TLSClientConfig("server.test"))
    server = ScriptedServer12(
        SERVER, CipherSuite12.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    )
    client.start()
    server.read_client_hello(client.data_to_send())
    handshake(client, server)
    events(client)
    return client, server


def data_records(server: ScriptedServer12, contents: list[bytes]) -> bytes:
    return b"".join(
        server.send(ContentType.application_data, content) for content in contents
    )


def test_records_in_one_read_one_event() -> None:
    client, server = connected()
    contents = record_contents(RECORDS_PER_READ)
    client.receive_data(data_records(server, contents))
    assert events(client) == [ApplicationData(b"".join(contents))]


def test_warning_alert_between_data_records() -> None:
    client, server = connected()
    wire = data_records(server, [b"before"])
    wire += server.send(ContentType.alert, UNRECOGNIZED_NAME)
    wire += data_records(server, [b"after"])
    client.receive_data(wire)
    assert events(client) == [ApplicationData(b"before"), ApplicationData(b"after")]


def test_alert_after_data_records() -> None:
    client, server = connected()
    contents = record_contents(3)
    wire = data_records(server, contents)
    wire += server.send(ContentType.alert, HANDSHAKE_FAILURE)
    with pytest.raises(alerts.AlertReceived) as caught:
        client.receive_data(wire)
    assert caught.value.description == AlertDescription.handshake_failure
    assert events(client) == [ApplicationData(b"".join(contents))]
    assert client.state == State12.CLOSED


def test_close_notify_mid_batch() -> None:
    client, server = connected()
    wire = data_records(server, [b"first", b"second"])
    wire += server.send(ContentType.alert, CLOSE_NOTIFY)
    wire += data_records(server, [b"after close_notify"])
    client.receive_data(wire)
    found = events(client)
    assert found == [ApplicationData(b"firstsecond"), CloseNotifyReceived()]
    assert client.receive_closed


def test_tampered_record_mid_batch() -> None:
    client, server = connected()
    good = data_records(server, [b"authenticated"])
    bad = bytearray(data_records(server, [b"tampered"]))
    bad[-1] ^= 1
    with pytest.raises(alerts.BadRecordMac):
        client.receive_data(good + bytes(bad))
    assert events(client) == [ApplicationData(b"authenticated")]
    assert client.state == State12.CLOSED


def test_empty_record_flood_in_one_read() -> None:
    client, server = connected()
    empties = [b""] * (MAX_CONSECUTIVE_EMPTY_RECORDS + 1)
    with pytest.raises(alerts.UnexpectedMessage) as caught:
        client.receive_data(data_records(server, [b"x", *empties]))
    assert f"more than {MAX_CONSECUTIVE_EMPTY_RECORDS} records" in str(caught.value)


def test_data_resets_empty_count_mid_batch() -> None:
    client, server = connected()
    empties = [b""] * MAX_CONSECUTIVE_EMPTY_RECORDS
    client.receive_data(data_records(server, [*empties, b"x", *empties]))
    assert events(client) == [ApplicationData(b"x")]
    assert client.state == State12.CONNECTED


def test_send_then_close_notify_in_order() -> None:
    client, server = connected()
    client.send_application_data(b"last data")
    client.send_close_notify()
    assert server.records(client.data_to_send()) == [
        (ContentType.application_data, b"last data"),
        (ContentType.alert, CLOSE_NOTIFY),
    ]
