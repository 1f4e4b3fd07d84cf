"""Batched delivery in the TLS 1.3 client: consecutive application data
records in one read become one `ApplicationData` event, while every record
is still checked on its own and whatever sits between them keeps its place.
"""

from __future__ import annotations

import itertools

import pytest
from pki import issue, make_ca
from scripted_server import ScriptedServer, complete_handshake
from tls_harness import events

from kmsproxy.tls import alerts
from kmsproxy.tls import messages as m
from kmsproxy.tls.alerts import AlertDescription
from kmsproxy.tls.client import ClientConnection, State
from kmsproxy.tls.config import TLSClientConfig
from kmsproxy.tls.events import ApplicationData, CloseNotifyReceived
from kmsproxy.tls.key_schedule import next_traffic_secret
from kmsproxy.tls.limits import EMPTY_RECORD_CREDIT_BYTES, MAX_EMPTY_RECORDS
from kmsproxy.tls.records import MAX_PLAINTEXT_LENGTH, ContentType, RecordCipher

CA = make_ca()
SERVER = issue(CA, "server", dns_names=("server.test",))

# Records per read in the batch tests: as many full records as the stream
# reads from the transport at once.
RECORDS_PER_READ = 16

CLOSE_NOTIFY = bytes([1, AlertDescription.close_notify])
HANDSHAKE_FAILURE = bytes([2, AlertDescription.handshake_failure])


def record_contents(count: int) -> list[bytes]:
    """Return `count` full-size contents that differ from each other, so a
    record lost, repeated or reordered changes the joined result."""
    pattern = itertools.cycle(range(251))
    return [
        bytes(itertools.islice(pattern, MAX_PLAINTEXT_LENGTH)) for _ in range(count)
    ]


def connected() -> tuple[ClientConnection, ScriptedServer]:
    client = ClientConnection(TLSClientConfig("server.test"))
    server = ScriptedServer(SERVER)
    complete_handshake(client, server)
    events(client)
    return client, server


def data_records(server: ScriptedServer, contents: list[bytes]) -> bytes:
    return b"".join(
        server.protect(ContentType.application_data, content) for content in contents
    )


def update_server_key(server: ScriptedServer) -> bytes:
    """Return a KeyUpdate record and switch the server to its next key."""
    update = m.KeyUpdate(m.KeyUpdateRequest.update_not_requested)
    record = server.protect(ContentType.handshake, m.push_key_update(update))
    assert server.server_cipher is not None
    secret = next_traffic_secret(server.suite, server.server_cipher.secret)
    server.server_cipher = RecordCipher(server.suite, secret)
    return record


def test_records_in_one_read_one_event() -> None:
    client, server = connected()
    contents = record_contents(RECORDS_PER_READ)
    client.receive_data(data_records(server, contents))
    assert events(client) == [ApplicationData(b"".join(contents))]


def test_records_across_reads_in_order() -> None:
    client, server = connected()
    contents = record_contents(RECORDS_PER_READ)
    wire = data_records(server, contents)
    # Cut inside the fourth record, so the first read ends mid-record.
    cut = 3 * len(wire) // RECORDS_PER_READ + 100
    client.receive_data(wire[:cut])
    client.receive_data(wire[cut:])
    found = events(client)
    assert found == [
        ApplicationData(b"".join(contents[:3])),
        ApplicationData(b"".join(contents[3:])),
    ]


def test_key_update_between_data_records() -> None:
    client, server = connected()
    before, after = record_contents(2)
    wire = data_records(server, [before])
    wire += update_server_key(server)
    wire += data_records(server, [after])
    client.receive_data(wire)
    assert events(client) == [ApplicationData(before), ApplicationData(after)]
    assert client.key_updates_received == 1


def test_old_key_after_key_update_rejected() -> None:
    # The record after the KeyUpdate is sealed under the old key. The client
    # must reject it, because its read key changed at the KeyUpdate.
    client, server = connected()
    old_cipher = server.server_cipher
    wire = data_records(server, [b"before"])
    wire += update_server_key(server)
    server.server_cipher = old_cipher
    wire += data_records(server, [b"old key"])
    with pytest.raises(alerts.BadRecordMac):
        client.receive_data(wire)
    assert events(client) == [ApplicationData(b"before")]


def test_alert_after_data_records() -> None:
    client, server = connected()
    contents = record_contents(3)
    wire = data_records(server, contents)
    wire += server.protect(ContentType.alert, HANDSHAKE_FAILURE)
    with pytest.raises(alerts.AlertReceived) as caught:
        client.receive_data(wire)
    assert caught.value.description == AlertDescription.handshake_failure
    assert events(client) == [ApplicationData(b"".join(contents))]
    assert client.state == State.CLOSED


def test_close_notify_mid_batch() -> None:
    client, server = connected()
    wire = data_records(server, [b"first", b"second"])
    wire += server.protect(ContentType.alert, CLOSE_NOTIFY)
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
    assert client.state == State.CLOSED


def test_empty_record_flood_in_one_read() -> None:
    client, server = connected()
    wire = data_records(server, [b"x"] + [b""] * (MAX_EMPTY_RECORDS + 1))
    with pytest.raises(alerts.UnexpectedMessage) as caught:
        client.receive_data(wire)
    assert f"more than {MAX_EMPTY_RECORDS} empty records" in str(caught.value)


def test_empty_records_at_limit_pass() -> None:
    client, server = connected()
    client.receive_data(data_records(server, [b"x"] + [b""] * MAX_EMPTY_RECORDS))
    assert events(client) == [ApplicationData(b"x")]
    assert client.state == State.CONNECTED


def test_data_pays_before_empty_record() -> None:
    # At the limit, data of EMPTY_RECORD_CREDIT_BYTES pays for the empty
    # record after it in the same read, as it would one record at a time.
    client, server = connected()
    client.receive_data(data_records(server, [b""] * MAX_EMPTY_RECORDS))
    client.receive_data(data_records(server, [b"d" * EMPTY_RECORD_CREDIT_BYTES, b""]))
    assert client.state == State.CONNECTED


def test_empty_record_before_payment_rejected() -> None:
    # The same two records in the other order: the empty record exceeds
    # the limit before the data pays anything.
    client, server = connected()
    client.receive_data(data_records(server, [b""] * MAX_EMPTY_RECORDS))
    wire = data_records(server, [b"", b"d" * EMPTY_RECORD_CREDIT_BYTES])
    with pytest.raises(alerts.UnexpectedMessage):
        client.receive_data(wire)
    assert events(client) == []


def test_send_then_close_notify_in_order() -> None:
    client, server = connected()
    client.send_application_data(b"last data")
    client.send_close_notify()
    assert server.read_client_records(client.data_to_send()) == [
        (ContentType.application_data, b"last data"),
        (ContentType.alert, CLOSE_NOTIFY),
    ]


def test_sends_join_into_one_output() -> None:
    client, server = connected()
    contents = record_contents(3)
    for content in contents:
        client.send_application_data(content)
    assert client.has_pending_output
    records = server.read_client_records(client.data_to_send())
    assert records == [(ContentType.application_data, c) for c in contents]
    assert not client.has_pending_output
    assert client.data_to_send() == b""
