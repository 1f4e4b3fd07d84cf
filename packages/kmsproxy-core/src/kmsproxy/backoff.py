"""Named backoff for key stores that go away and come back.

A TPM resource manager restarts, a YubiKey is pulled out, a cloud endpoint
stops answering. While the store is gone, every signature would fail after
the same slow timeout, so a backend keeps one `Backoff` per device: after a
failure it refuses new attempts until the delay has passed (the proxy
answers 502 at once meanwhile), then lets one attempt through. Delays grow
from `BackoffPolicy.initial` by `multiplier` up to `maximum`.

The name of the policy appears in every message, so a user reading
"retrying in 4.0 s (tpm-reconnect)" can find the setting in the docs.
Each transition (store lost, store back) is logged once, not per attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to wait between attempts to reach a failing store.

    `name` identifies the policy in messages and docs, e.g. `tpm-reconnect`.
    Delays are in seconds.
    """

    name: str
    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(
                f"backoff {self.name}: need 0 < initial ({self.initial}) "
                f"<= maximum ({self.maximum})"
            )
        if self.multiplier < 1:
            raise ValueError(
                f"backoff {self.name}: multiplier {self.multiplier} must be >= 1"
            )

    def delay_after(self, failures: int) -> float:
        """Return the wait after `failures` consecutive failures (at least 1)."""
        exponent = max(failures, 1) - 1
        # Cap the exponent so a long outage cannot overflow the float.
        delay = self.initial * self.multiplier ** min(exponent, 64)
        return min(delay, self.maximum)


class Backoff:
    """The state of one store: healthy, or failing until a deadline.

    Thread-safe: backends call it from worker threads. `subject` names the
    store in log lines (a redacted URI or a device path).
    """

    def __init__(
        self,
        policy: BackoffPolicy,
        subject: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.subject = subject
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._not_before = 0.0

    @property
    def failures(self) -> int:
        """Consecutive failures since the last success."""
        return self._failures

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def seconds_until_ready(self) -> float:
        """Return the seconds until the next attempt may run, or 0 if it may run now."""
        with self._lock:
            return max(0.0, self._not_before - self._clock())

    def ready(self) -> bool:
        return self.seconds_until_ready() == 0.0

    def record_failure(self, reason: str) -> float:
        """Note a failed attempt and return the delay before the next one.

        A failure reported while an earlier failure's hold is still in effect
        belongs to the same outage, so it changes neither the count nor the
        deadline. Requests already in flight when the store went away fail
        one after another. Counting each of them would reach `maximum` after
        a single short outage.

        Logs a warning on the first failure only; later ones log at DEBUG.
        """
        with self._lock:
            now = self._clock()
            if self._failures and now < self._not_before:
                remaining = self._not_before - now
                failures = self._failures
                logger.debug(
                    "store failure during backoff: %s: %s; attempt=%d retry_in=%.1fs",
                    self.subject,
                    reason,
                    failures,
                    remaining,
                )
                return remaining
            self._failures += 1
            delay = self.policy.delay_after(self._failures)
            self._not_before = now + delay
            failures = self._failures
        if failures == 1:
            logger.warning(
                "store unavailable: %s: %s; retrying in %.1f s (backoff %s)",
                self.subject,
                reason,
                delay,
                self.policy.name,
            )
        else:
            logger.debug(
                "store still unavailable: %s: %s; attempt=%d retry_in=%.1fs",
                self.subject,
                reason,
                failures,
                delay,
            )
        return delay

    def record_success(self) -> None:
        """Note a working attempt; logs once when the store comes back."""
        with self._lock:
            failures = self._failures
            self._failures = 0
            self._not_before = 0.0
        if failures:
            logger.warning(
                "store available again: %s after %d failed %s",
                self.subject,
                failures,
                "attempt" if failures == 1 else "attempts",
            )

    def waiting_message(self) -> str:
        """Return a sentence for an error raised while attempts are held back."""
        return (
            f"retrying in {self.seconds_until_ready():.1f} s "
            f"(backoff {self.policy.name})"
        )
