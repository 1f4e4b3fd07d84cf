"""The TLS 1.2 client against real servers: `openssl s_server -tls1_2`,
Apache httpd and nginx configured for TLS 1.2 only.

Most tests connect through `connect_tls`, whose ClientHello offers TLS 1.3
and 1.2, so they cover the hand-over to the TLS 1.2 machine. A small
test-only driver runs `ClientConnection12` from its own TLS 1.2 only
ClientHello inside the production `TLSClientStream`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import anyio
import peers
import pytest
from peers import LOOPBACK, Peer, start_apache, start_nginx
from pki import Issued, KeyType, issue, make_ca

from kmsproxy.signer import SignatureScheme, SoftwareSigner
from kmsproxy.tls import (
    AlertReceived,
    ClientIdentity,
    SessionCache,
    TLSClientConfig,
    TLSClientStream,
    TrustStore,
    connect_tls,
)
from kmsproxy.tls.tls12.client12 import ClientConnection12

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

SERVER_NAME = "server.test"

# Bound on receive() calls while reading one response; responses here are a
# few KiB, so 1000 reads is far more than any of them needs.
MAX_READS = 1000

# Time s_server gets to act on a stdin command and print its result. It
# answers within milliseconds on an idle machine; 10 s only guards a hang.
PEER_REPLY_TIMEOUT_SECONDS = 10.0

# Pause between two stdin commands to s_server, so it reads them separately
# (it acts on `R` only when the read returns that line alone). It polls
# stdin in a loop, so 0.3 s is ample on an idle machine (estimate).
STDIN_GAP_SECONDS = 0.3

# OpenSSL's names for the six suites the client offers.
OPENSSL_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}

PKCS1_SCHEMES = (
    SignatureScheme.rsa_pkcs1_sha256,
    SignatureScheme.rsa_pkcs1_sha384,
    SignatureScheme.rsa_pkcs1_sha512,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CountingSigner(SoftwareSigner):
    """A software signer that counts its signatures and may be limited to
    some schemes, like a token that lacks RSA-PSS."""

    def __init__(
        self, issued: Issued, uri: str, schemes: Sequence[SignatureScheme] = ()
    ) -> None:
        super().__init__(issued.key, uri)
        self._only = tuple(schemes)
        self.signed: list[SignatureScheme] = []

    @property
    def schemes(self) -> Sequence[SignatureScheme]:
        if self._only:
            return self._only
        return super().schemes

    async def sign(self, data: bytes, scheme: SignatureScheme) -> bytes:
        self.signed.append(scheme)
        return await super().sign(data, scheme)


class Files:
    """A CA, its trust store, and the directory its PEM files go to."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = make_ca("tls12 CA")
        self.ca_path = directory / "ca.crt"
        self.ca_path.write_bytes(self.ca.chain_pem())
        self.trust = TrustStore.load([self.ca_path], include_system=False)

    def server(self, key_type: KeyType) -> tuple[Path, Path]:
        """Issue and write a server certificate; return (cert, key)."""
        server = issue(
            self.ca,
            "server",
            dns_names=(SERVER_NAME,),
            ip_addresses=(LOOPBACK,),
            key_type=key_type,
        )
        key, cert = server.write(self.directory, f"server-{key_type}")
        return cert, key

    def client(
        self, key_type: KeyType, schemes: Sequence[SignatureScheme] = ()
    ) -> tuple[ClientIdentity, CountingSigner]:
        issued = issue(self.ca, f"client {key_type}", client=True, key_type=key_type)
        signer = CountingSigner(issued, f"file:client-{key_type}.key", schemes)
        return ClientIdentity(tuple(issued.chain), signer), signer

    def config(self, identities: Sequence[ClientIdentity]) -> TLSClientConfig:
        return TLSClientConfig(SERVER_NAME, identities, self.trust)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


async def open_tls12(
    port: int, config: TLSClientConfig, *, tls12_only: bool = False
) -> TLSClientStream:
    """Connect with `connect_tls`, or with a TLS 1.2 only ClientHello."""
    transport = await anyio.connect_tcp(LOOPBACK, port)
    try:
        if not tls12_only:
            return await connect_tls(transport, config)
        stream = TLSClientStream(transport, ClientConnection12(config))
        with anyio.fail_after(config.handshake_timeout):
            await stream._run_handshake()
    except BaseException:
        await transport.aclose()
        raise
    return stream


async def read_to_end(stream: TLSClientStream) -> bytes:
    data = b""
    for _ in range(MAX_READS):
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return data
    raise AssertionError(f"no close_notify after {MAX_READS} reads")


async def read_line(stream: TLSClientStream) -> bytes:
    data = b""
    for _ in range(MAX_READS):
        data += await stream.receive()
        if data.endswith(b"\n"):
            return data
    raise AssertionError(f"no line after {MAX_READS} reads: {data!r}")


async def read_into(stream: TLSClientStream, lines: list[bytes]) -> None:
    lines.append(await read_line(stream))


async def www_get(
    peer: Peer, config: TLSClientConfig, *, tls12_only: bool = False
) -> tuple[TLSClientStream, bytes]:
    stream = await open_tls12(peer.port, config, tls12_only=tls12_only)
    async with stream:
        await stream.send(b"GET / HTTP/1.0\r\n\r\n")
        return stream, await read_to_end(stream)


def start_s_server12(
    files: Files,
    server_key: KeyType,
    *options: str,
    verify: str = "-Verify",
    interactive: bool = False,
    protocol: str = "-tls1_2",
) -> Peer:
    """Start `openssl s_server -tls1_2` on a free loopback port.

    `peers.start_openssl_server` passes -tls1_3, which s_server does not let
    a later protocol flag override, so this builds its own command line.
    `verify` is "-Verify" (require a client certificate), "-verify"
    (request one) or "" (no CertificateRequest). Without `interactive`
    the server runs with -www. `protocol` "" lets it offer TLS 1.3 too.
    """
    cert, key = files.server(server_key)
    port = peers.free_port()
    directory = files.directory / f"s_server-{port}"
    directory.mkdir()
    log_path = directory / "output.log"
    args = ["openssl", "s_server", "-accept", f"{LOOPBACK}:{port}"]
    if protocol:
        args.append(protocol)
    args += ["-cert", str(cert), "-key", str(key), "-CAfile", str(files.ca_path)]
    if verify:
        args += [verify, "1"]
    if not interactive:
        args.append("-www")
    args += options
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    peer = Peer("s_server", process, LOOPBACK, port, directory, log_path)
    peers._wait_until_ready(peer, "ACCEPT")
    return peer


# openssl s_server -tls1_2 -Verify 1


@pytest.mark.parametrize("tls12_only", [False, True], ids=["hand_over", "tls12_only"])
@pytest.mark.parametrize("suite", sorted(OPENSSL_SUITES))
async def test_s_server_suite(files: Files, suite: str, tls12_only: bool) -> None:
    server_key: KeyType = "rsa2048" if "_RSA_" in suite else "p256"
    identity, signer = files.client("p256")
    with start_s_server12(files, server_key, "-cipher", OPENSSL_SUITES[suite]) as peer:
        stream, response = await www_get(
            peer, files.config([identity]), tls12_only=tls12_only
        )
    assert stream.version == "TLSv1.2"
    assert stream.cipher_suite == suite
    assert response.startswith(b"HTTP/1.0 200 ok")
    assert f"TLSv1.2, Cipher is {OPENSSL_SUITES[suite]}".encode() in response
    assert signer.signed == [SignatureScheme.ecdsa_secp256r1_sha256]


# OpenSSL's names for the NamedGroup code points (RFC 8422 section 5.1.1).
GROUP_CODES = {"P-384": 0x0018, "P-521": 0x0019}


@pytest.mark.parametrize("group", sorted(GROUP_CODES))
async def test_s_server_ecdhe_group(files: Files, group: str) -> None:
    """s_server prefers `group` for ECDHE. OpenSSL 3.0 checks the P-256
    certificates against the same list, so P-256 stays in it, second."""
    identity, _ = files.client("p256")
    groups = f"{group}:P-256"
    with start_s_server12(files, "p256", "-groups", groups, "-serverpref") as peer:
        stream, response = await www_get(peer, files.config([identity]))
    assert stream.version == "TLSv1.2"
    assert isinstance(stream.connection, ClientConnection12)
    assert stream.connection.key_exchange_group == GROUP_CODES[group]
    assert response.startswith(b"HTTP/1.0 200 ok")


@pytest.mark.parametrize("server_key", ["p256", "p384", "rsa2048"])
@pytest.mark.parametrize(
    ("client_key", "scheme"),
    [
        ("p256", SignatureScheme.ecdsa_secp256r1_sha256),
        ("p384", SignatureScheme.ecdsa_secp384r1_sha384),
        ("p521", SignatureScheme.ecdsa_secp521r1_sha512),
        ("rsa2048", SignatureScheme.rsa_pss_rsae_sha256),
        ("rsa2048", SignatureScheme.rsa_pkcs1_sha256),
    ],
)
async def test_s_server_client_key(
    files: Files, server_key: KeyType, client_key: KeyType, scheme: SignatureScheme
) -> None:
    identity, signer = files.client(client_key, [scheme])
    with start_s_server12(files, server_key) as peer:
        stream, response = await www_get(peer, files.config([identity]))
    assert stream.client_identity == identity
    assert signer.signed == [scheme]
    # s_server -www prints the client certificate it verified.
    assert f"Subject: CN=client {client_key}\n".encode() in response


async def test_s_server_without_request(files: Files) -> None:
    identity, signer = files.client("p256")
    with start_s_server12(files, "p256", verify="") as peer:
        stream, response = await www_get(peer, files.config([identity]))
    assert stream.client_identity is None
    assert signer.signed == []
    assert b"no client certificate available" in response


async def test_s_server_requires_certificate(files: Files) -> None:
    with (
        start_s_server12(files, "p256") as peer,
        pytest.raises(AlertReceived) as raised,
    ):
        await www_get(peer, files.config([]))
    # OpenSSL 3.0 answers an empty Certificate with handshake_failure (40).
    assert raised.value.description == 40


async def test_s_server_renegotiation_certificate(files: Files) -> None:
    """s_server's `R` command renegotiates and requires a client
    certificate, as a server guarding one location does."""
    identity, signer = files.client("rsa2048", PKCS1_SCHEMES)
    lines: list[bytes] = []
    with start_s_server12(
        files, "p256", "-verify_return_error", verify="", interactive=True
    ) as peer:
        # No CertificateRequest in the first handshake: -verify is unset.
        stream = await open_tls12(peer.port, files.config([identity]))
        async with stream:
            assert stream.client_identity is None
            await stream.send(b"before\n")
            assert peer.wait_for_log("before")
            peer.write_stdin(b"R\n")
            # The HelloRequest arrives on our next read; we renegotiate with
            # our certificate, then the server sends a line.
            await anyio.sleep(STDIN_GAP_SECONDS)
            peer.write_stdin(b"after\n")
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                line = await read_line(stream)
                # Our data waits until the renegotiation is done, which the
                # reader task drives by processing the server's records.
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(read_into, stream, lines)
                    await stream.send(b"done\n")
                    sent = await anyio.to_thread.run_sync(peer.wait_for_log, "done")
                    peer.write_stdin(b"bye\n")
            log = peer.log()
    assert line == b"after\n"
    assert sent
    assert lines == [b"bye\n"]
    # s_server's verify callback prints each certificate it checked.
    assert "depth=0 CN = client rsa2048\n" in log
    assert isinstance(stream.connection, ClientConnection12)
    assert stream.connection.renegotiations == 1
    assert stream.client_identity == identity
    assert signer.signed == [SignatureScheme.rsa_pkcs1_sha256]


async def test_s_server_renegotiation_plain(files: Files) -> None:
    """s_server's `r` command renegotiates, and with -verify OpenSSL 3.0
    does not request the certificate again, so no second signature."""
    identity, signer = files.client("p384")
    lines: list[bytes] = []
    with start_s_server12(files, "p256", verify="-verify", interactive=True) as peer:
        stream = await open_tls12(peer.port, files.config([identity]))
        async with stream:
            peer.write_stdin(b"r\n")
            await anyio.sleep(STDIN_GAP_SECONDS)
            peer.write_stdin(b"after\n")
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                await read_into(stream, lines)
                # Reading on drives the renegotiation to its end.
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(read_into, stream, lines)
                    await stream.send(b"done\n")
                    sent = await anyio.to_thread.run_sync(peer.wait_for_log, "done")
                    peer.write_stdin(b"bye\n")
    assert lines == [b"after\n", b"bye\n"]
    assert sent
    assert isinstance(stream.connection, ClientConnection12)
    assert stream.connection.renegotiations == 1
    assert stream.client_identity == identity
    assert signer.signed == [SignatureScheme.ecdsa_secp384r1_sha384]


async def test_pkcs1_key_offers_tls12_only(files: Files) -> None:
    """A key without a TLS 1.3 scheme makes connect_tls offer TLS 1.2
    alone, even to a server that speaks TLS 1.3."""
    identity, signer = files.client("rsa2048", PKCS1_SCHEMES)
    with start_s_server12(files, "p256", protocol="") as peer:
        stream, response = await www_get(peer, files.config([identity]))
    assert stream.version == "TLSv1.2"
    assert signer.signed == [SignatureScheme.rsa_pkcs1_sha256]
    assert b"Subject: CN=client rsa2048\n" in response


async def test_tls13_server_keeps_tls13(files: Files) -> None:
    identity, signer = files.client("p256")
    with start_s_server12(files, "p256", protocol="") as peer:
        stream, _ = await www_get(peer, files.config([identity]))
    assert stream.version == "TLSv1.3"
    assert signer.signed == [SignatureScheme.ecdsa_secp256r1_sha256]


# Resumption with RFC 5077 tickets

# Sequential connections in the resumption test: the count the proxy's
# resumption requirement names for one upstream.
RESUMED_CONNECTIONS = 50


async def test_s_server_tickets_one_signature(files: Files) -> None:
    identity, signer = files.client("p256")
    config = TLSClientConfig(
        SERVER_NAME,
        [identity],
        files.trust,
        session_cache=SessionCache(),
        session_key="s_server",
    )
    resumed = []
    with start_s_server12(files, "p256") as peer:
        for _ in range(RESUMED_CONNECTIONS):
            stream, response = await www_get(peer, config)
            resumed.append(stream.resumed)
    assert resumed == [False] + [True] * (RESUMED_CONNECTIONS - 1)
    assert signer.signed == [SignatureScheme.ecdsa_secp256r1_sha256]
    # s_server -www reports a resumed session as "Reused".
    assert b"Reused, TLSv1.2" in response


async def test_s_server_without_tickets(files: Files) -> None:
    identity, signer = files.client("p256")
    config = TLSClientConfig(
        SERVER_NAME,
        [identity],
        files.trust,
        session_cache=SessionCache(),
        session_key="s_server",
    )
    with start_s_server12(files, "p256", "-no_ticket") as peer:
        first, _ = await www_get(peer, config)
        second, response = await www_get(peer, config)
    assert not first.resumed
    assert not second.resumed
    assert len(signer.signed) == 2
    assert b"New, TLSv1.2" in response


# Apache httpd asking for a certificate in one <Location> only


async def read_until(stream: TLSClientStream, marker: bytes) -> bytes:
    data = b""
    for _ in range(MAX_READS):
        data += await stream.receive()
        if data.endswith(marker):
            return data
    raise AssertionError(f"no {marker!r} after {MAX_READS} reads: {data!r}")


async def test_apache_location_renegotiation(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With TLS 1.2, mod_ssl enforces `SSLVerifyClient require` inside a
    <Location> by renegotiating; the open path needs no certificate."""
    template = peers._APACHE_CONFIG
    assert "SSLProtocol -all +TLSv1.3" in template
    monkeypatch.setattr(
        peers,
        "_APACHE_CONFIG",
        template.replace("SSLProtocol -all +TLSv1.3", "SSLProtocol -all +TLSv1.2"),
    )
    identity, signer = files.client("p256")
    cert, key = files.server("p256")
    with start_apache(files.directory, cert, key, files.ca_path) as peer:
        stream = await open_tls12(peer.port, files.config([identity]))
        async with stream:
            await stream.send(b"GET /open HTTP/1.1\r\nHost: server.test\r\n\r\n")
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                open_response = await read_until(stream, b"open\n")
            signed_before = list(signer.signed)
            await stream.send(
                b"GET /protected/page HTTP/1.1\r\nHost: server.test\r\n"
                b"Connection: close\r\n\r\n"
            )
            with anyio.fail_after(PEER_REPLY_TIMEOUT_SECONDS):
                protected_response = await read_to_end(stream)
        subjects = peer.client_subjects()
    assert open_response.startswith(b"HTTP/1.1 200 OK")
    assert signed_before == []
    assert protected_response.startswith(b"HTTP/1.1 200 OK")
    assert protected_response.endswith(b"protected\n")
    assert signer.signed == [SignatureScheme.ecdsa_secp256r1_sha256]
    assert stream.version == "TLSv1.2"
    # mod_ssl logs "-" for a request without a client certificate.
    assert subjects == ["-", "CN=client p256"]


# nginx with ssl_protocols TLSv1.2


@pytest.mark.parametrize("server_key", ["p256", "rsa2048"])
async def test_nginx_tls12(files: Files, server_key: KeyType) -> None:
    identity, signer = files.client("p384")
    cert, key = files.server(server_key)
    with start_nginx(
        files.directory, cert, key, files.ca_path, protocols="TLSv1.2"
    ) as peer:
        stream = await open_tls12(peer.port, files.config([identity]))
        async with stream:
            await stream.send(
                b"GET /subject HTTP/1.1\r\nHost: server.test\r\n"
                b"Connection: close\r\n\r\n"
            )
            response = await read_to_end(stream)
        subjects = peer.client_subjects()
    assert stream.version == "TLSv1.2"
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert response.endswith(b"subject=CN=client p384\n")
    assert subjects == ["CN=client p384"]
    assert signer.signed == [SignatureScheme.ecdsa_secp384r1_sha384]
