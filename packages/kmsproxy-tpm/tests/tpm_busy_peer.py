"""A loopback TPM that responds to every command with TPM_RC_RETRY.

It speaks the two swtpm sockets that tpm2-tss's swtpm TCTI uses: TPM
commands on `port`, control commands on `port + 1`. Every control command
succeeds; every TPM command gets a 10-byte response header whose response
code is TPM_RC_RETRY (0x922, "the TPM was not able to start the command"),
which is what a TPM busy with another user's command returns.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from types import TracebackType

from peers import LOOPBACK
from swtpm_emulator import free_port_pair

TPM_ST_NO_SESSIONS = 0x8001
TPM_RC_RETRY = 0x922
RESPONSE_HEADER_BYTES = 10
COMMAND_HEADER_BYTES = 10

# A control command's response: a 4-byte TPM_SUCCESS result.
CONTROL_SUCCESS = b"\x00\x00\x00\x00"

# Bound on reading one command, so a stuck client cannot hold a thread.
SOCKET_TIMEOUT_SECONDS = 5.0

# Largest command read; TPM 2.0 commands are at most a few KiB.
MAX_COMMAND_BYTES = 64 * 1024


class BusyTPM:
    """The two listening sockets and their accept threads."""

    def __init__(self) -> None:
        self.port = free_port_pair()
        self._listeners = [
            _listen(self.port),
            _listen(self.port + 1),
        ]
        self.commands = 0
        handlers: list[Callable[[socket.socket], bool]] = [
            self._answer_retry,
            _answer_control,
        ]
        self._threads = [
            threading.Thread(target=self._accept, args=(listener, handler), daemon=True)
            for listener, handler in zip(self._listeners, handlers, strict=True)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host={LOOPBACK},port={self.port}"

    def _accept(
        self, listener: socket.socket, handler: Callable[[socket.socket], bool]
    ) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.settimeout(SOCKET_TIMEOUT_SECONDS)
            threading.Thread(
                target=self._serve, args=(connection, handler), daemon=True
            ).start()

    def _serve(
        self, connection: socket.socket, handler: Callable[[socket.socket], bool]
    ) -> None:
        with connection, contextlib.suppress(OSError):
            while handler(connection):
                pass

    def _answer_retry(self, connection: socket.socket) -> bool:
        answered = _answer_retry(connection)
        if answered:
            self.commands += 1
        return answered

    def close(self) -> None:
        for listener in self._listeners:
            # shutdown wakes the thread blocked in accept(); close alone does not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for thread in self._threads:
            thread.join(timeout=SOCKET_TIMEOUT_SECONDS)

    def __enter__(self) -> BusyTPM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _listen(port: int) -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, port))
    listener.listen()
    return listener


def _receive_exactly(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _answer_retry(connection: socket.socket) -> bool:
    """Read one TPM command and respond TPM_RC_RETRY; False at end of stream."""
    header = _receive_exactly(connection, COMMAND_HEADER_BYTES)
    if header is None:
        return False
    _, size, _ = struct.unpack(">HII", header)
    rest = min(max(size - COMMAND_HEADER_BYTES, 0), MAX_COMMAND_BYTES)
    if rest and _receive_exactly(connection, rest) is None:
        return False
    connection.sendall(
        struct.pack(">HII", TPM_ST_NO_SESSIONS, RESPONSE_HEADER_BYTES, TPM_RC_RETRY)
    )
    return True


def _answer_control(connection: socket.socket) -> bool:
    """Respond success to one control command; False at end of stream."""
    data = connection.recv(MAX_COMMAND_BYTES)
    if not data:
        return False
    connection.sendall(CONTROL_SUCCESS)
    return True


@contextlib.contextmanager
def busy_tpm() -> Iterator[BusyTPM]:
    with BusyTPM() as tpm:
        yield tpm
