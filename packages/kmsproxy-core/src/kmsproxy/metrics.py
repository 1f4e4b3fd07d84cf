"""Process-wide counters of TLS client work: handshakes by kind and Signer
calls.

A hardware signer can take hundreds of milliseconds per signature, so the
ratio of `signer_calls` to handshakes shows whether session resumption is
saving signatures. The TLS stream increments the counters; the proxy reads
`snapshot()`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counter values at one moment, each counted since process start."""

    signer_calls: int
    full_handshakes: int
    resumed_handshakes: int


class Metrics:
    """Monotonic counters, safe to increment from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signer_calls = 0
        self._full_handshakes = 0
        self._resumed_handshakes = 0

    def count_signer_call(self) -> None:
        with self._lock:
            self._signer_calls += 1

    def count_handshake(self, *, resumed: bool) -> None:
        with self._lock:
            if resumed:
                self._resumed_handshakes += 1
            else:
                self._full_handshakes += 1

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(
                signer_calls=self._signer_calls,
                full_handshakes=self._full_handshakes,
                resumed_handshakes=self._resumed_handshakes,
            )


# The counters of this process.
metrics = Metrics()
