"""Time the CPU that kmsproxy's TLS client spends per handshake.

Each handshake runs in memory, with no socket: the client and a Python `ssl`
server (OpenSSL) pass their flights through a pair of `ssl.MemoryBIO`s in
one thread. Every handshake uses mutual authentication. The server
certificate and the client certificate are on P-256 keys from a throwaway CA
written to a temporary directory. A clock reads the thread's CPU time around
the client's calls only, so the server's work does not count. The client's
own calls are the `ClientConnection` construction, `start`, `receive_data`,
`data_to_send` and the client signature. The signature goes through
`sign_with_private_key`, the function behind the file backend's
`SoftwareSigner`, without the event loop.

The baseline is Python's `ssl` client doing the same handshake with the same
key, against the same server in the same run, timed the same way. Its
figures are what OpenSSL costs in C, so the ratio shows how far the Python
client is from it.

"Resumed" handshakes offer the newest ticket from the previous handshake
(PSK with a fresh x25519 share, psk_dhe_ke). Both clients process the
server's NewSessionTickets inside the timed calls, because a real connection
pays for them too. "Resumed TLS 1.2" runs against a server context limited
to TLS 1.2, where kmsproxy's TLS 1.3 client hands over to its TLS 1.2
client and resumes with an RFC 5077 ticket.

The two clients do not generate the same key shares in the "full" rows:
kmsproxy's client generates an X25519MLKEM768 and an x25519 share, and
Python's `ssl` client on OpenSSL 3.0 generates one x25519 share. In the
resumed TLS 1.3 rows each generates one x25519 share, kmsproxy's through
the group hint that the previous handshake stored.

A round runs `handshakes` handshakes of one kind one after another and keeps
their median (`statistics.median` for both clients), so each row contains
one median per round. Run it as
`.venv/bin/python benchmarks/handshake.py` from the repository root.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packages" / "kmsproxy-core" / "tests"))

import pki  # noqa: E402  (the core tests' helper, found through sys.path)

from kmsproxy.signer import (  # noqa: E402
    PrivateKey,
    SoftwareSigner,
    sign_with_private_key,
)
from kmsproxy.tls import ClientIdentity, SessionCache, TrustStore  # noqa: E402
from kmsproxy.tls.client import ClientConnection  # noqa: E402
from kmsproxy.tls.config import TLSClientConfig  # noqa: E402
from kmsproxy.tls.events import SignatureRequested  # noqa: E402
from kmsproxy.tls.tls12.client12 import ClientConnection12  # noqa: E402

# Handshakes per round and rounds per row. Five rounds give a min and a max
# besides the median. With these values the whole run took 4 s on 2 cores
# of an AMD EPYC (load average under 1).
HANDSHAKES = 100
ROUNDS = 5

# Handshakes run and discarded before each row, so that first-call costs
# (imports, caches, the first ticket) do not count.
WARMUP_HANDSHAKES = 5

# Flights one handshake may take: ClientHello, the server's flight, the
# client's Finished, and the tickets, with spares for a HelloRetryRequest.
MAX_FLIGHTS = 8

SERVER_NAME = "localhost"

Clock = Callable[[], int]


@dataclass
class Setup:
    """The throwaway PKI and the three contexts built from it."""

    server: ssl.SSLContext
    server12: ssl.SSLContext
    client: ssl.SSLContext
    identity: ClientIdentity
    client_key: PrivateKey
    trust: TrustStore


@dataclass(frozen=True)
class Kind:
    """One kind of handshake: its row label, and what the server allows."""

    label: str
    resumed: bool
    tls12: bool = False

    def server(self, setup: Setup) -> ssl.SSLContext:
        return setup.server12 if self.tls12 else setup.server


KINDS = (
    Kind("full", resumed=False),
    Kind("resumed", resumed=True),
    Kind("resumed TLS 1.2", resumed=True, tls12=True),
)


@dataclass
class Row:
    """One kind of handshake with one client: medians per round, in µs."""

    client: str
    handshake: str
    medians_us: list[float]
    # Of the kmsproxy rows only: each round's median time to build the
    # ClientHello, from the `ClientConnection` construction through `start`
    # to the first `data_to_send`.
    hello_us: list[float]

    @property
    def median_us(self) -> float:
        return statistics.median(self.medians_us)


def make_setup(directory: Path) -> Setup:
    ca = pki.make_ca("handshake benchmark CA")
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.chain_pem())
    server = pki.issue(ca, "server", dns_names=(SERVER_NAME,))
    server_key, server_cert = server.write(directory, "server")
    client = pki.issue(ca, "client p256", client=True)
    client_key, client_cert = client.write(directory, "client")

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_3
    server_context.load_cert_chain(server_cert, server_key)
    server_context.load_verify_locations(ca_path)
    server_context.verify_mode = ssl.CERT_REQUIRED

    server12_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server12_context.minimum_version = ssl.TLSVersion.TLSv1_2
    server12_context.maximum_version = ssl.TLSVersion.TLSv1_2
    server12_context.load_cert_chain(server_cert, server_key)
    server12_context.load_verify_locations(ca_path)
    server12_context.verify_mode = ssl.CERT_REQUIRED

    # TLS 1.2 and 1.3, as kmsproxy's client offers.
    client_context = ssl.create_default_context(cafile=str(ca_path))
    client_context.minimum_version = ssl.TLSVersion.TLSv1_2
    client_context.load_cert_chain(client_cert, client_key)

    signer = SoftwareSigner(client.key, "file:client.key")
    return Setup(
        server=server_context,
        server12=server12_context,
        client=client_context,
        identity=ClientIdentity(tuple(client.chain), signer),
        client_key=client.key,
        trust=TrustStore.load([ca_path], include_system=False),
    )


def kmsproxy_handshake(
    setup: Setup,
    server_context: ssl.SSLContext,
    settings: TLSClientConfig,
    clock: Clock,
) -> tuple[int, int, bool]:
    """Run one handshake; return (client ns, ClientHello build ns, resumed).

    The ClientHello build time covers the `ClientConnection` construction,
    `start` and the first `data_to_send`.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(incoming, outgoing, server_side=True)

    started = clock()
    client = ClientConnection(settings)
    client.start()
    # The TLS 1.2 client takes over when the server selects TLS 1.2.
    active: ClientConnection | ClientConnection12 = client
    reply = client.data_to_send()
    hello_ns = clock() - started
    spent = hello_ns

    for _ in range(MAX_FLIGHTS):
        incoming.write(reply)
        server_done = _advance(server)
        flight = outgoing.read()
        started = clock()
        active.receive_data(flight)
        active = client.tls12 or client
        while (event := active.next_event()) is not None:
            if isinstance(event, SignatureRequested):
                signature = sign_with_private_key(
                    setup.client_key, event.content, event.scheme
                )
                active.provide_signature(signature)
        reply = active.data_to_send()
        spent += clock() - started
        if server_done:
            break
    else:
        raise RuntimeError(f"kmsproxy handshake took more than {MAX_FLIGHTS} flights")
    if not active.handshake_complete:
        raise RuntimeError("the server finished but the kmsproxy client did not")
    return spent, hello_ns, active.resumed


def ssl_handshake(
    setup: Setup,
    server_context: ssl.SSLContext,
    session: ssl.SSLSession | None,
    clock: Clock,
) -> tuple[int, ssl.SSLSession | None, bool]:
    """Run one handshake; return (client ns, the session to resume, resumed)."""
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(server_in, server_out, server_side=True)

    started = clock()
    client = setup.client.wrap_bio(
        client_in, client_out, server_hostname=SERVER_NAME, session=session
    )
    client_done = _advance(client)
    spent = clock() - started

    for _ in range(MAX_FLIGHTS):
        server_in.write(client_out.read())
        server_done = _advance(server)
        client_in.write(server_out.read())
        started = clock()
        if client_done:
            # Reading processes the NewSessionTickets after the handshake.
            _read_tickets(client)
        else:
            client_done = _advance(client)
        spent += clock() - started
        if server_done and client_done:
            break
    else:
        raise RuntimeError(f"ssl handshake took more than {MAX_FLIGHTS} flights")
    return spent, client.session, client.session_reused


def _advance(endpoint: ssl.SSLObject) -> bool:
    """Advance one side's handshake; return True once it has completed."""
    try:
        endpoint.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def _read_tickets(client: ssl.SSLObject) -> None:
    try:
        client.read()
    except ssl.SSLWantReadError:
        return
    raise RuntimeError("the server sent application data during the handshake")


def measure_kmsproxy(
    setup: Setup, kind: Kind, handshakes: int, rounds: int, clock: Clock
) -> Row:
    resumed = kind.resumed
    cache = SessionCache() if resumed else None
    settings = TLSClientConfig(
        SERVER_NAME,
        [setup.identity],
        setup.trust,
        session_cache=cache,
        session_key="benchmark" if resumed else None,
    )
    server = kind.server(setup)
    medians: list[float] = []
    hellos: list[float] = []
    for round_number in range(rounds + 1):
        count = WARMUP_HANDSHAKES if round_number == 0 else handshakes
        samples: list[int] = []
        hello_samples: list[int] = []
        for _ in range(count):
            spent, hello, was_resumed = kmsproxy_handshake(
                setup, server, settings, clock
            )
            if was_resumed != resumed and round_number > 0:
                raise RuntimeError(
                    f"kmsproxy handshake resumed={was_resumed}, expected {resumed}"
                )
            samples.append(spent)
            hello_samples.append(hello)
        if round_number > 0:
            # The same median as the Python ssl rows, so the ratio compares
            # like with like.
            medians.append(statistics.median(samples) / 1000)
            hellos.append(statistics.median(hello_samples) / 1000)
    return Row("kmsproxy", kind.label, medians, hellos)


def measure_ssl(
    setup: Setup, kind: Kind, handshakes: int, rounds: int, clock: Clock
) -> Row:
    resumed = kind.resumed
    server = kind.server(setup)
    medians: list[float] = []
    session: ssl.SSLSession | None = None
    for round_number in range(rounds + 1):
        count = WARMUP_HANDSHAKES if round_number == 0 else handshakes
        samples = []
        for _ in range(count):
            spent, new_session, was_resumed = ssl_handshake(
                setup, server, session if resumed else None, clock
            )
            if was_resumed != resumed and round_number > 0:
                raise RuntimeError(
                    f"ssl handshake resumed={was_resumed}, expected {resumed}"
                )
            session = new_session
            samples.append(spent)
        if round_number > 0:
            medians.append(statistics.median(samples) / 1000)
    return Row("Python ssl", kind.label, medians, [])


def measure(handshakes: int = HANDSHAKES, rounds: int = ROUNDS) -> list[Row]:
    """Measure every row; each kmsproxy row comes before its Python ssl baseline."""
    clock = time.thread_time_ns
    with tempfile.TemporaryDirectory(prefix="kmsproxy-bench-handshake-") as work:
        setup = make_setup(Path(work))
        rows = []
        for kind in KINDS:
            rows.append(measure_kmsproxy(setup, kind, handshakes, rounds, clock))
            rows.append(measure_ssl(setup, kind, handshakes, rounds, clock))
    return rows


def render(rows: list[Row]) -> str:
    baseline = {
        row.handshake: row.median_us for row in rows if row.client != "kmsproxy"
    }
    lines = [
        "| client | handshake | CPU µs, median (min to max) "
        "| ClientHello build µs | ratio to Python ssl |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        spread = (
            f"{row.median_us:.0f} ({min(row.medians_us):.0f} to "
            f"{max(row.medians_us):.0f})"
        )
        hello = f"{statistics.median(row.hello_us):.0f}" if row.hello_us else ""
        ratio = row.median_us / baseline[row.handshake]
        lines.append(
            f"| {row.client} | {row.handshake} | {spread} | {hello} | {ratio:.2f} |"
        )
    lines += [
        "",
        "ClientHello build µs: the ClientConnection construction, start and "
        "the first data_to_send.",
        "full: kmsproxy generates X25519MLKEM768 and x25519 key shares, and "
        "Python ssl its OpenSSL's default ones (one x25519 share on OpenSSL 3.0).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--handshakes",
        type=int,
        default=HANDSHAKES,
        help=f"handshakes per round (default {HANDSHAKES})",
    )
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"rounds per row (default {ROUNDS})"
    )
    args = parser.parse_args(argv)
    if args.handshakes < 1 or args.rounds < 1:
        parser.error("--handshakes and --rounds must be at least 1")
    started = time.monotonic()
    rows = measure(args.handshakes, args.rounds)
    print(render(rows))
    print(
        f"\n{args.rounds} rounds of {args.handshakes} handshakes per row, "
        f"{ssl.OPENSSL_VERSION}, {time.monotonic() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
