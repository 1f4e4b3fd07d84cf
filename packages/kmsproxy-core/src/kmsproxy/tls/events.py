"""Events the sans-IO client reports to its caller through `next_event`."""

from __future__ import annotations

from dataclasses import dataclass

from ..signer import SignatureScheme
from .config import ClientIdentity


@dataclass(frozen=True)
class SignatureRequested:
    """Sign `content` with `identity.signer` using `scheme`, then call
    `provide_signature`."""

    identity: ClientIdentity
    scheme: SignatureScheme
    content: bytes


@dataclass(frozen=True)
class HandshakeComplete:
    """Both Finished messages are exchanged; application data may flow."""


@dataclass(frozen=True)
class ApplicationData:
    """Decrypted application data: the content of every application data
    record that arrived in a row, in order, so one read gives one event."""

    data: bytes


@dataclass(frozen=True)
class CloseNotifyReceived:
    """The server sent close_notify: it will send no more data."""


Event = SignatureRequested | HandshakeComplete | ApplicationData | CloseNotifyReceived
