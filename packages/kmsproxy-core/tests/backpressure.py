"""A writer that keeps sending while its reader is stopped, for the relay's
back-pressure tests: the writer must stall, and every byte must then
arrive in order once the reader reads again."""

from __future__ import annotations

import anyio
import anyio.abc

# Bytes the writer tries to send while the reader is stopped. The kernel
# buffers of the two loopback hops take a few MiB, and the relay keeps one
# step. A relay that kept reading without waiting for its sends would take
# all of it.
TRANSFER_BYTES = 64 * 2**20

# The writer counts as stopped when no send completed for this long.
STALL_SECONDS = 1.0

# Upper bound for the whole transfer once the reader reads again. Loopback
# moves 64 MiB through TLS in a few seconds even on a loaded machine.
TRANSFER_TIMEOUT_SECONDS = 60.0

# Receive buffer of the stopped reader's socket, in bytes, so that the
# kernel cannot hide a missing back-pressure by buffering everything.
SMALL_RECEIVE_BUFFER_BYTES = 64 * 1024

# Bytes asked for per read once the reader reads again.
READ_BYTES = 2**20


async def stall_then_read(
    writer: anyio.abc.ByteStream,
    reader: anyio.abc.ByteStream,
    pattern: bytes,
    writes: int,
) -> tuple[int, bytes]:
    """Send `pattern` `writes` times on `writer` while `reader` is stopped.

    Return the bytes sent when the writer stalled (or reached
    TRANSFER_BYTES), and everything `reader` then received.
    """
    sent = [0]

    async def write_all() -> None:
        for _ in range(writes):
            await writer.send(pattern)
            sent[0] += len(pattern)

    async with anyio.create_task_group() as group:
        group.start_soon(write_all)
        await _wait_for_stall(sent)
        stalled_at = sent[0]
        received = await _read_exactly(reader, writes * len(pattern))
    return stalled_at, received


async def _wait_for_stall(sent: list[int]) -> None:
    """Wait until `sent` stops growing for STALL_SECONDS or reaches
    TRANSFER_BYTES, for at most TRANSFER_TIMEOUT_SECONDS."""
    with anyio.fail_after(TRANSFER_TIMEOUT_SECONDS):
        while sent[0] < TRANSFER_BYTES:
            before = sent[0]
            await anyio.sleep(STALL_SECONDS)
            if sent[0] == before:
                return


async def _read_exactly(stream: anyio.abc.ByteStream, length: int) -> bytes:
    received = bytearray()
    with anyio.fail_after(TRANSFER_TIMEOUT_SECONDS):
        while len(received) < length:
            received += await stream.receive(READ_BYTES)
    return bytes(received)
