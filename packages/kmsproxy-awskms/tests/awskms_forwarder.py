"""A loopback TCP forwarder, run as its own process: LISTEN_PORT -> TARGET_PORT.

`python awskms_forwarder.py LISTEN_PORT TARGET_PORT` listens on 127.0.0.1
and copies bytes both ways to 127.0.0.1:TARGET_PORT. The outage tests put
it in front of moto and stop it by PID: the listening socket and every
forwarded connection close at once, so KMS requests are refused until a new
forwarder listens on the same port. It runs in a process of its own
because the proxy opens keys with blocking calls in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

LOOPBACK = "127.0.0.1"

# Bytes read at once; KMS requests and responses are a few KiB.
CHUNK_BYTES = 65536


async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(CHUNK_BYTES):
            writer.write(chunk)
            await writer.drain()
    writer.close()


async def forward(
    target_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        target_reader, target_writer = await asyncio.open_connection(
            LOOPBACK, target_port
        )
    except OSError:
        writer.close()
        return
    await asyncio.gather(copy(reader, target_writer), copy(target_reader, writer))


async def main(listen_port: int, target_port: int) -> None:
    server = await asyncio.start_server(
        lambda reader, writer: forward(target_port, reader, writer),
        LOOPBACK,
        listen_port,
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
