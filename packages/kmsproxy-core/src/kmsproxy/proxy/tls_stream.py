"""`ServerTLSStream`: the server side of TLS over any anyio byte stream.

The proxy terminates two kinds of TLS with Python's `ssl` module: the
client's connection to an `https://` proxy URL, and the client's TLS inside
a tunnel. anyio's `TLSStream` raises NotImplementedError from `send_eof`,
but a tunnel must pass on a half-close. This stream sends close_notify and
keeps reading, which TLS 1.3 allows (RFC 8446 section 6.1) and OpenSSL
supports for TLS 1.2 too.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.abc

# Seconds a client gets to complete its TLS handshake with the proxy. A
# loopback handshake takes milliseconds; the bound only stops a stalled
# client from holding a connection open.
HANDSHAKE_TIMEOUT_SECONDS = 10.0

# Bytes read from the transport per call: 16 maximum-size TLS records with
# their headers and expansion (RFC 8446 section 5.2). Each read has a
# fixed cost (a system call and a turn of the event loop) besides the copy,
# so a bulk upload takes many records per read.
_TRANSPORT_READ_BYTES = 16 * (16384 + 256 + 5)

_T = TypeVar("_T")


class ServerTLSStream(anyio.abc.ByteStream):
    """A TLS server session over `transport`, built with `wrap`."""

    def __init__(
        self,
        transport: anyio.abc.ByteStream,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self.transport = transport
        self.ssl_object = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._eof_sent = False
        # Orders writes to the transport: `receive` and `send` both flush
        # the outgoing BIO, and the relay calls them from two tasks at once.
        # `fast_acquire` skips the turn of the event loop that an uncontended
        # acquire would otherwise take, because the transport's send yields.
        self._send_lock = anyio.Lock(fast_acquire=True)

    @classmethod
    async def wrap(
        cls,
        transport: anyio.abc.ByteStream,
        context: ssl.SSLContext,
        *,
        initial_data: bytes = b"",
        handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
    ) -> ServerTLSStream:
        """Run the server handshake; `initial_data` was read from `transport`.

        Raise `ssl.SSLError`, `anyio.EndOfStream` or `TimeoutError`; the
        caller closes the transport.
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        incoming.write(initial_data)
        ssl_object = context.wrap_bio(incoming, outgoing, server_side=True)
        stream = cls(transport, ssl_object, incoming, outgoing)
        with anyio.fail_after(handshake_timeout):
            await stream._run(ssl_object.do_handshake)
        return stream

    @property
    def version(self) -> str | None:
        return self.ssl_object.version()

    @property
    def alpn_protocol(self) -> str | None:
        return self.ssl_object.selected_alpn_protocol()

    async def _flush(self, *, wait: bool = True) -> None:
        """Send everything in the outgoing BIO to the transport.

        With `wait` false and another task sending, return at once: that
        task drains the BIO before it releases the lock. `receive` flushes
        this way, so it keeps reading while `send` waits for a slow peer.
        """
        if not wait and self._send_lock.locked():
            return
        if not self._outgoing.pending and not self._send_lock.locked():
            # Nothing is queued and no other task is sending.
            return
        async with self._send_lock:
            while data := self._outgoing.read():
                await self.transport.send(data)

    async def _run(self, operation: Callable[[], _T], *, wait: bool = True) -> _T:
        """Call an SSLObject method, moving bytes until it stops waiting.

        `wait` is passed on to `_flush`.
        """
        while True:
            try:
                result = operation()
            except ssl.SSLWantReadError:
                await self._flush(wait=wait)
                try:
                    data = await self.transport.receive(_TRANSPORT_READ_BYTES)
                except anyio.EndOfStream:
                    self._incoming.write_eof()
                else:
                    self._incoming.write(data)
                continue
            await self._flush(wait=wait)
            return result

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            data = await self._run(
                functools.partial(self.ssl_object.read, max_bytes), wait=False
            )
        except ssl.SSLZeroReturnError:
            raise anyio.EndOfStream from None
        except ssl.SSLEOFError:
            # The client closed TCP without close_notify. Browsers do this
            # routinely, and HTTP framing detects truncation, so treat it as
            # an end of stream.
            raise anyio.EndOfStream from None
        if not data:
            raise anyio.EndOfStream
        if len(data) < max_bytes and (
            self._incoming.pending or self.ssl_object.pending()
        ):
            data = self._read_buffered(data, max_bytes)
        return data

    def _read_buffered(self, first: bytes, max_bytes: int) -> bytes:
        """Append what the records already received hold, up to `max_bytes`.

        `SSLObject.read` returns one record's plaintext at most. An end of
        stream or error met here is left for the next `receive`, which
        meets it again.
        """
        chunks = [first]
        size = len(first)
        while size < max_bytes:
            try:
                data = self.ssl_object.read(max_bytes - size)
            except ssl.SSLError:
                break
            if not data:
                break
            chunks.append(data)
            size += len(data)
        return b"".join(chunks)

    async def send(self, item: bytes) -> None:
        if self._eof_sent:
            raise anyio.ClosedResourceError
        view = memoryview(item)
        while view:
            written = await self._run(functools.partial(self.ssl_object.write, view))
            view = view[written:]

    async def send_eof(self) -> None:
        """Send close_notify and keep receiving (a TLS half-close)."""
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.ssl_object.unwrap()
        except ssl.SSLWantReadError:
            # unwrap() has queued close_notify and would now wait for the
            # client's; the client may keep sending, so do not wait.
            pass
        except ssl.SSLError:
            pass
        await self._flush()

    async def aclose(self) -> None:
        """Send close_notify (best effort), then close the transport."""
        try:
            with anyio.move_on_after(1):
                await self.send_eof()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            await self.transport.aclose()
