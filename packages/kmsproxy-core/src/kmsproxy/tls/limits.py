"""Bounds on records that cost the client work but carry no application
data: empty records, ignored alerts and KeyUpdates.

RFC 8446 allows a server to send any number of these, so a hostile server
could keep the event loop busy while the tunnel moves almost no data. Each
kind has a `FloodBudget`: a debt that each such record raises and that
application data pays back, so interleaving a few data bytes between bursts
does not reset it.
"""

from __future__ import annotations

from .alerts import UnexpectedMessage

# Empty records (empty application_data, padding only, or an ignored
# user_canceled alert) accepted beyond what application data has paid for.
# RFC 8446 allows empty records for traffic-analysis resistance but sets no
# bound. 64 is our choice, and each 256 bytes of application data pays for
# one more, so a peer that pads real traffic heavily still passes.
MAX_EMPTY_RECORDS = 64
EMPTY_RECORD_CREDIT_BYTES = 256

# KeyUpdates accepted beyond what application data has paid for. Each one
# costs an HKDF step and, when an update is requested, a response record.
# A well-behaved server updates its key after many records, so 32 in a row
# is already a flood, and one full 16 KiB record pays for one more.
MAX_KEY_UPDATES = 32
KEY_UPDATE_CREDIT_BYTES = 2**14


class FloodBudget:
    """A count of records without application data, paid back by data.

    `spend` raises `UnexpectedMessage` once more than `limit` records are
    unpaid, and `earn` pays back one record per `credit_bytes` of
    application data, carrying the remainder to the next call.
    """

    def __init__(self, record_kind: str, limit: int, credit_bytes: int) -> None:
        self.record_kind = record_kind
        self.limit = limit
        self.credit_bytes = credit_bytes
        self.debt = 0
        self._unpaid_bytes = 0

    def spend(self) -> None:
        self.debt += 1
        if self.debt > self.limit:
            raise UnexpectedMessage(
                f"more than {self.limit} {self.record_kind} without application data "
                f"(each {self.credit_bytes} bytes of data allows one more)"
            )

    def earn(self, data_length: int) -> None:
        if not self.debt:
            return
        self._unpaid_bytes += data_length
        paid, self._unpaid_bytes = divmod(self._unpaid_bytes, self.credit_bytes)
        self.debt = max(0, self.debt - paid)
        if not self.debt:
            self._unpaid_bytes = 0
