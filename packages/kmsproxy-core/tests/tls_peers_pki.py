"""A throwaway CA and client identities for TLS tests against real peers,
and a client that connects, sends a request and reads to the end.

`test_tls_interop.py`, `test_tls_pha.py`, `test_tls_resumption.py` and
`test_tls_group_hint.py` share these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
from peers import LOOPBACK, Peer
from pki import Issued, KeyType, issue, make_ca

from kmsproxy.signer import SoftwareSigner
from kmsproxy.tls import (
    ClientIdentity,
    TLSClientConfig,
    TLSClientStream,
    TrustStore,
    connect_tls,
)

SERVER_NAME = "server.test"

# Bound on receive() calls while reading one response; responses here are a
# few KiB, so 1000 reads is far more than any of them needs.
MAX_READS = 1000


@dataclass
class Files:
    """A CA, its trust store, and where its PEM files live."""

    directory: Path
    ca: Issued
    ca_path: Path
    trust: TrustStore

    def server(self, key_type: KeyType = "p256", **kwargs: object) -> tuple[Path, Path]:
        """Issue and write a server certificate; return (cert, key) paths."""
        server = issue(
            self.ca,
            "server",
            dns_names=(SERVER_NAME,),
            ip_addresses=(LOOPBACK,),
            key_type=key_type,
            **kwargs,  # type: ignore[arg-type]
        )
        stem = f"server-{key_type}-{len(list(self.directory.iterdir()))}"
        key, cert = server.write(self.directory, stem)
        return cert, key

    def client(self, key_type: KeyType = "p256") -> ClientIdentity:
        client = issue(self.ca, f"client {key_type}", client=True, key_type=key_type)
        signer = SoftwareSigner(client.key, f"file:client-{key_type}.key")
        return ClientIdentity(tuple(client.chain), signer)


def make_files(directory: Path, name: str) -> Files:
    ca = make_ca(name)
    ca_path = directory / f"{name.replace(' ', '-')}.crt"
    ca_path.write_bytes(ca.chain_pem())
    return Files(
        directory, ca, ca_path, TrustStore.load([ca_path], include_system=False)
    )


def config(
    files: Files,
    identities: Sequence[ClientIdentity],
    server_name: str = SERVER_NAME,
    **settings: object,
) -> TLSClientConfig:
    return TLSClientConfig(server_name, identities, files.trust, **settings)  # type: ignore[arg-type]


async def open_tls(port: int, settings: TLSClientConfig) -> TLSClientStream:
    transport = await anyio.connect_tcp(LOOPBACK, port)
    try:
        return await connect_tls(transport, settings)
    except BaseException:
        await transport.aclose()
        raise


async def read_to_end(stream: TLSClientStream) -> bytes:
    """Read until the server's close_notify (anyio.EndOfStream)."""
    data = b""
    for _ in range(MAX_READS):
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return data
    raise AssertionError(f"no close_notify after {MAX_READS} reads")


async def s_server_get(
    peer: Peer, settings: TLSClientConfig
) -> tuple[TLSClientStream, bytes]:
    stream = await open_tls(peer.port, settings)
    async with stream:
        await stream.send(b"GET / HTTP/1.0\r\n\r\n")
        return stream, await read_to_end(stream)
