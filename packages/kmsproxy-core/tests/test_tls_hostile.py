"""Hostile servers: a scripted TCP server on loopback that breaks TLS 1.3 on
purpose, driven through `connect_tls` and through the proxy end to end.

Each scenario must end in the right error (and the matching alert on the
wire, where the client detected the failure) within `SCENARIO_TIMEOUT_SECONDS`,
with no traceback in the log and no task left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import pytest
from peers import LOOPBACK
from pki import Issued, issue, make_ca
from scripted_server import ScriptedServer, plaintext_record

from kmsproxy import Proxy, ProxyConfig
from kmsproxy.signer import SoftwareSigner
from kmsproxy.tls import (
    HANDSHAKE_TIMEOUT_SECONDS,
    Alert,
    AlertDescription,
    BadRecordMac,
    CertificateVerifyFailed,
    ClientIdentity,
    ConnectionLost,
    DecodeError,
    DecryptError,
    HandshakeTimeout,
    RecordOverflow,
    TLSClientConfig,
    TLSClientStream,
    TLSError,
    TrustStore,
    UnexpectedMessage,
    UnsupportedExtension,
    connect_tls,
)
from kmsproxy.tls import messages as m
from kmsproxy.tls.records import ContentType

pytestmark = pytest.mark.anyio

SERVER_NAME = "localhost"

# Upper bound on one scenario, handshake and error included. Every failure
# here is detected on loopback in milliseconds; 10 s only turns a hang into
# a failure instead of a stuck test.
SCENARIO_TIMEOUT_SECONDS = 10.0

# Handshake timeout the client uses against the silent server: short, so the
# stall test is quick, and far above a loopback handshake (milliseconds).
STALL_HANDSHAKE_TIMEOUT_SECONDS = 0.5

# Time the hostile server waits for the client's alert and close after its
# script ends. The client sends its alert right after the failure.
CLIENT_CLOSE_TIMEOUT_SECONDS = 5.0

# Bound on reads while the server collects what the client sent.
MAX_SERVER_READS = 1000

# Time curl gets for one request through the proxy, in seconds: the proxy's
# upstream handshake timeout (the stall case waits all of it) plus slack.
CURL_MAX_TIME_SECONDS = int(HANDSHAKE_TIMEOUT_SECONDS) + 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Keys:
    """The upstream CA, a valid server leaf for `SERVER_NAME`, and a client."""

    ca: Issued
    server: Issued
    client: Issued
    trust: TrustStore

    def identity(self) -> ClientIdentity:
        return ClientIdentity(
            tuple(self.client.chain), SoftwareSigner(self.client.key, "file:client")
        )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("hostile")
    ca = make_ca("hostile upstream CA")
    server = issue(ca, "localhost", dns_names=(SERVER_NAME,), ip_addresses=(LOOPBACK,))
    client = issue(make_ca("hostile client CA"), "client", client=True)
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.chain_pem())
    trust = TrustStore.load([ca_path], include_system=False)
    return Keys(ca, server, client, trust)


# The scripted server


class ServerSide:
    """The server's end of one connection: the script reads and writes here."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def read_record(self) -> bytes:
        """Return the next whole record the client sent (header included)."""
        for _ in range(MAX_SERVER_READS):
            if len(self.buffer) >= 5:
                length = int.from_bytes(self.buffer[3:5], "big")
                if len(self.buffer) >= 5 + length:
                    record = self.buffer[: 5 + length]
                    self.buffer = self.buffer[5 + length :]
                    return record
            self.buffer += await self.stream.receive()
        raise AssertionError(f"no whole record after {MAX_SERVER_READS} reads")

    async def read_client_finished(self) -> None:
        """Read records until the client's Finished (skipping its CCS)."""
        for _ in range(MAX_SERVER_READS):
            record = await self.read_record()
            if record[0] == ContentType.application_data:
                return
        raise AssertionError("the client sent no Finished")

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)


Script = Callable[[ScriptedServer, ServerSide], Awaitable[None]]


@dataclass
class HostileServer:
    port: int
    client_output: list[bytes] = field(default_factory=list)
    servers: list[ScriptedServer] = field(default_factory=list)

    def client_alert(self) -> AlertDescription | None:
        """Return the alert the client sent after the script, if any."""
        wire = b"".join(self.client_output)
        if not wire or not self.servers:
            return None
        if wire[0] == ContentType.alert:
            return AlertDescription(wire[6])
        server = self.servers[-1]
        if server.server_cipher is None:
            return None
        try:
            return server.client_alert(wire)
        except (AssertionError, IndexError, ValueError, Alert):
            return None


@contextlib.asynccontextmanager
async def serve_hostile(issued: Issued, script: Script) -> AsyncIterator[HostileServer]:
    """Run a TCP server on a free 127.0.0.1 port that reads one ClientHello,
    runs `script`, then collects what the client sends until it closes."""
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    hostile = HostileServer(port)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            side = ServerSide(stream)
            server = ScriptedServer(issued)
            hostile.servers.append(server)
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                server.read_client_hello(await side.read_record())
                await script(server, side)
                with anyio.move_on_after(CLIENT_CLOSE_TIMEOUT_SECONDS):
                    hostile.client_output.append(side.buffer)
                    for _ in range(MAX_SERVER_READS):
                        hostile.client_output.append(await stream.receive())

    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, handle)
        try:
            yield hostile
        finally:
            tasks.cancel_scope.cancel()


# Scripts


def flip_last_byte(message: bytes) -> bytes:
    return message[:-1] + bytes([message[-1] ^ 1])


async def truncated_record(server: ScriptedServer, side: ServerSide) -> None:
    record = server.server_hello()
    await side.send(record[: len(record) // 2])
    await side.stream.send_eof()


async def overlong_record_length(server: ScriptedServer, side: ServerSide) -> None:
    await side.send(bytes([ContentType.handshake, 3, 3, 0xFF, 0xFF]) + bytes(64))


async def overlong_handshake_length(server: ScriptedServer, side: ServerSide) -> None:
    message, _ = server.server_hello_message()
    # 200 KiB: longer than any ServerHello the client accepts.
    header = bytes([m.HandshakeType.server_hello]) + (200 * 1024).to_bytes(3, "big")
    await side.send(plaintext_record(ContentType.handshake, header + message[4:]))


async def truncated_handshake_length(server: ScriptedServer, side: ServerSide) -> None:
    message, _ = server.server_hello_message()
    short = m.encode_handshake(m.HandshakeType.server_hello, message[4:40])
    await side.send(plaintext_record(ContentType.handshake, short))


async def record_version(server: ScriptedServer, side: ServerSide) -> None:
    # RFC 8446 section 5.1: legacy_record_version "MUST be ignored for all
    # purposes", so a plaintext ServerHello record with 0x0000 must connect.
    hello = bytearray(server.server_hello())
    hello[1:3] = b"\x00\x00"
    await side.send(bytes(hello) + server.flight())
    await side.read_client_finished()
    await side.send(server.protect(ContentType.application_data, b"hello"))


async def protected_record_version(server: ScriptedServer, side: ServerSide) -> None:
    # A protected record's header is its AEAD additional data (RFC 8446
    # section 5.2), so a version changed after sealing fails authentication.
    hello = server.server_hello()
    flight = bytearray(server.flight())
    flight[1:3] = b"\x03\x01"
    await side.send(hello + bytes(flight))


async def plaintext_over_limit(server: ScriptedServer, side: ServerSide) -> None:
    await side.send(
        bytes([ContentType.handshake, 3, 3])
        + (2**14 + 1).to_bytes(2, "big")
        + bytes(2**14 + 1)
    )


async def ciphertext_over_limit(server: ScriptedServer, side: ServerSide) -> None:
    # 2^14 + 256 is the limit for TLSCiphertext.length (RFC 8446 section 5.2).
    size = 2**14 + 257
    await side.send(
        server.server_hello()
        + bytes([ContentType.application_data, 3, 3])
        + size.to_bytes(2, "big")
        + os.urandom(size)
    )


async def bad_finished(server: ScriptedServer, side: ServerSide) -> None:
    flight = server.server_hello() + server.encrypted_extensions()
    flight += server.certificate() + server.certificate_verify()
    flight += server.handshake(flip_last_byte(server.finished_message()))
    await side.send(flight)


async def bad_certificate_verify(server: ScriptedServer, side: ServerSide) -> None:
    flight = server.server_hello() + server.encrypted_extensions()
    flight += server.certificate()
    flight += server.handshake(flip_last_byte(server.certificate_verify_message()))
    await side.send(flight + server.finished())


async def valid_flight(server: ScriptedServer, side: ServerSide) -> None:
    await side.send(server.server_hello() + server.flight())


# An extension type the client never offers (not in `messages.ExtensionType`).
# RFC 8446 section 4.2: a response to an extension not offered is
# unsupported_extension.
UNOFFERED_EXTENSION = 0x4242


async def unsolicited_extension(server: ScriptedServer, side: ServerSide) -> None:
    extension = (UNOFFERED_EXTENSION, b"")
    flight = server.server_hello() + server.encrypted_extensions([extension])
    flight += server.certificate() + server.certificate_verify()
    await side.send(flight + server.finished())


async def certificate_first(server: ScriptedServer, side: ServerSide) -> None:
    flight = server.server_hello() + server.certificate()
    await side.send(flight + server.encrypted_extensions())


async def garbage_after_handshake(server: ScriptedServer, side: ServerSide) -> None:
    await side.send(server.server_hello() + server.flight())
    await side.read_client_finished()
    garbage = os.urandom(100)
    await side.send(
        bytes([ContentType.application_data, 3, 3])
        + len(garbage).to_bytes(2, "big")
        + garbage
    )


async def stall(server: ScriptedServer, side: ServerSide) -> None:
    # Silent until serve_hostile's task group is cancelled.
    await anyio.sleep_forever()


# The cases


@dataclass(frozen=True)
class Case:
    script: Script
    error: type[TLSError]
    alert: AlertDescription | None
    server: str = "valid"  # which certificate the server presents


CASES = {
    "truncated-record": Case(truncated_record, ConnectionLost, None),
    "overlong-record-length": Case(
        overlong_record_length, RecordOverflow, AlertDescription.record_overflow
    ),
    "overlong-handshake-length": Case(
        overlong_handshake_length, DecodeError, AlertDescription.decode_error
    ),
    "truncated-handshake-length": Case(
        truncated_handshake_length, DecodeError, AlertDescription.decode_error
    ),
    "protected-record-version": Case(
        protected_record_version, BadRecordMac, AlertDescription.bad_record_mac
    ),
    "plaintext-over-limit": Case(
        plaintext_over_limit, RecordOverflow, AlertDescription.record_overflow
    ),
    "ciphertext-over-limit": Case(
        ciphertext_over_limit, RecordOverflow, AlertDescription.record_overflow
    ),
    "bad-finished": Case(bad_finished, DecryptError, AlertDescription.decrypt_error),
    "bad-certificate-verify": Case(
        bad_certificate_verify, DecryptError, AlertDescription.decrypt_error
    ),
    "other-name": Case(
        valid_flight,
        CertificateVerifyFailed,
        AlertDescription.bad_certificate,
        server="other",
    ),
    "expired": Case(
        valid_flight,
        CertificateVerifyFailed,
        AlertDescription.certificate_expired,
        server="expired",
    ),
    "unsolicited-extension": Case(
        unsolicited_extension,
        UnsupportedExtension,
        AlertDescription.unsupported_extension,
    ),
    "certificate-first": Case(
        certificate_first, UnexpectedMessage, AlertDescription.unexpected_message
    ),
    "stall": Case(stall, HandshakeTimeout, None),
}


def server_certificate(keys: Keys, kind: str) -> Issued:
    if kind == "other":
        return issue(keys.ca, "other", dns_names=("other.test",))
    if kind == "expired":
        now = datetime.datetime.now(datetime.UTC)
        return issue(
            keys.ca,
            "localhost",
            dns_names=(SERVER_NAME,),
            not_before=now - datetime.timedelta(days=10),
            not_after=now - datetime.timedelta(days=1),
        )
    return keys.server


def client_config(keys: Keys, **settings: object) -> TLSClientConfig:
    return TLSClientConfig(SERVER_NAME, [keys.identity()], keys.trust, **settings)  # type: ignore[arg-type]


async def open_tls(port: int, config: TLSClientConfig) -> TLSClientStream:
    transport = await anyio.connect_tcp(LOOPBACK, port)
    try:
        return await connect_tls(transport, config)
    except BaseException:
        await transport.aclose()
        raise


def other_tasks() -> set[asyncio.Task[object]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.exc_info is not None or "Traceback" in record.getMessage()
    ]


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_handshake(
    keys: Keys, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    caplog.set_level(logging.DEBUG)
    case = CASES[name]
    tasks_before = other_tasks()
    issued = server_certificate(keys, case.server)
    settings: dict[str, object] = {}
    if case.error is HandshakeTimeout:
        settings["handshake_timeout"] = STALL_HANDSHAKE_TIMEOUT_SECONDS
    with anyio.fail_after(SCENARIO_TIMEOUT_SECONDS):
        async with serve_hostile(issued, case.script) as hostile:
            with pytest.raises(case.error) as raised:
                await open_tls(hostile.port, client_config(keys, **settings))
    if case.alert is not None:
        assert isinstance(raised.value, Alert)
        assert raised.value.description == case.alert
        assert hostile.client_alert() == case.alert
    assert tracebacks(caplog) == []
    assert other_tasks() == tasks_before


async def test_hostile_other_name_message(keys: Keys) -> None:
    issued = server_certificate(keys, "other")
    with anyio.fail_after(SCENARIO_TIMEOUT_SECONDS):
        async with serve_hostile(issued, valid_flight) as hostile:
            with pytest.raises(CertificateVerifyFailed) as raised:
                await open_tls(hostile.port, client_config(keys))
    assert "does not match" in str(raised.value)
    assert "'localhost'" in str(raised.value)


async def test_hostile_record_version_ignored(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with anyio.fail_after(SCENARIO_TIMEOUT_SECONDS):
        async with serve_hostile(keys.server, record_version) as hostile:
            stream = await open_tls(hostile.port, client_config(keys))
            async with stream:
                data = await stream.receive()
    assert data == b"hello"
    assert tracebacks(caplog) == []


async def test_hostile_garbage_after_handshake(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tasks_before = other_tasks()
    with anyio.fail_after(SCENARIO_TIMEOUT_SECONDS):
        async with serve_hostile(keys.server, garbage_after_handshake) as hostile:
            stream = await open_tls(hostile.port, client_config(keys))
            async with stream:
                with pytest.raises(BadRecordMac) as raised:
                    await stream.receive()
    assert raised.value.description == AlertDescription.bad_record_mac
    assert tracebacks(caplog) == []
    assert other_tasks() == tasks_before


# Through the proxy


PROXY_CASES = [name for name in CASES if name != "stall"]


async def curl_through_proxy(
    keys: Keys, tmp_path: Path, issued: Issued, script: Script
) -> subprocess.CompletedProcess[bytes]:
    """Start a proxy and the hostile server, and let curl ask the proxy for
    https://localhost:PORT/ on it; return curl's result."""
    if shutil.which("curl") is None:
        pytest.fail("curl not found on PATH (install the Debian package curl)")
    local_ca = make_ca("hostile local CA")
    local_ca.write(tmp_path, "local-ca")
    keys.client.write(tmp_path, "client")
    (tmp_path / "upstream-ca.crt").write_bytes(keys.ca.chain_pem())
    config = ProxyConfig(
        ca_key=tmp_path / "local-ca.key",
        ca_certificate=tmp_path / "local-ca.crt",
        client_keys=[tmp_path / "client.key"],
        client_certificates=[tmp_path / "client.crt"],
        trust=[tmp_path / "upstream-ca.crt"],
        include_system_trust=False,
        listen=f"{LOOPBACK}:0",
        pac_listen=None,
        handle_signals=False,
    )
    proxy = Proxy(config)
    with anyio.fail_after(CURL_MAX_TIME_SECONDS + SCENARIO_TIMEOUT_SECONDS):
        async with (
            serve_hostile(issued, script) as hostile,
            anyio.create_task_group() as group,
        ):
            addresses = await group.start(proxy.serve)
            result = await anyio.run_process(
                [
                    "curl",
                    "--silent",
                    "--show-error",
                    "--max-time",
                    str(CURL_MAX_TIME_SECONDS),
                    "--proxy",
                    addresses.proxy_url,
                    "--cacert",
                    str(tmp_path / "local-ca.crt"),
                    "--write-out",
                    "status=%{http_code}",
                    f"https://{SERVER_NAME}:{hostile.port}/",
                ],
                check=False,
                stdin=subprocess.DEVNULL,
            )
            group.cancel_scope.cancel()
    return result


@pytest.mark.parametrize("name", PROXY_CASES)
async def test_hostile_through_proxy(
    keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """The proxy answers a 502 page with the reason connect_tls gives."""
    caplog.set_level(logging.DEBUG)
    case = CASES[name]
    issued = server_certificate(keys, case.server)

    # The same script against connect_tls gives the reason the page must name.
    with anyio.fail_after(SCENARIO_TIMEOUT_SECONDS):
        async with serve_hostile(issued, case.script) as hostile:
            with pytest.raises(case.error) as raised:
                await open_tls(hostile.port, client_config(keys))
    reason = str(raised.value)

    result = await curl_through_proxy(keys, tmp_path, issued, case.script)
    assert result.stdout.endswith(b"status=502"), result.stderr
    assert reason
    assert reason.encode() in result.stdout
    assert tracebacks(caplog) == []


async def test_hostile_stall_through_proxy(
    keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A silent upstream costs the proxy its full handshake timeout, then a
    502 page that says so."""
    caplog.set_level(logging.DEBUG)
    result = await curl_through_proxy(keys, tmp_path, keys.server, stall)
    assert result.stdout.endswith(b"status=502"), result.stderr
    assert b"timed out" in result.stdout
    assert tracebacks(caplog) == []
