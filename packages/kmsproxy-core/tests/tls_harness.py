"""Helpers shared by the byte-level client specifications.

`test_tls_client.py` (TLS 1.3) and `test_tls12_client.py` (TLS 1.2) drive a
sans-IO client connection against a scripted server and read its events
the same way.
"""

from __future__ import annotations

from typing import Protocol

from kmsproxy.tls.events import Event

# Bound on next_event() calls in one drain. One handshake or one received
# flight queues a handful of events, so 100 is far more than a test needs.
MAX_EVENTS = 100


class EventSource(Protocol):
    """A client connection of either TLS version, as far as events go."""

    def next_event(self) -> Event | None: ...


def events(client: EventSource) -> list[Event]:
    """Drain the events `client` has queued, up to MAX_EVENTS."""
    found: list[Event] = []
    for _ in range(MAX_EVENTS):
        event = client.next_event()
        if event is None:
            break
        found.append(event)
    return found
