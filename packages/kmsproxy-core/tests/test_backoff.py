"""The named backoff that device backends share."""

from __future__ import annotations

import logging

import pytest

from kmsproxy.backoff import Backoff, BackoffPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delays_grow_to_the_maximum() -> None:
    policy = BackoffPolicy("test", initial=0.5, maximum=3.0, multiplier=2.0)
    assert [policy.delay_after(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_huge_failure_count_stays_at_maximum() -> None:
    policy = BackoffPolicy("test", initial=1.0, maximum=30.0)
    assert policy.delay_after(10_000) == 30.0


@pytest.mark.parametrize(
    ("initial", "maximum", "multiplier"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)]
)
def test_bad_policy_is_refused(
    initial: float, maximum: float, multiplier: float
) -> None:
    with pytest.raises(ValueError, match="backoff bad"):
        BackoffPolicy("bad", initial=initial, maximum=maximum, multiplier=multiplier)


def test_failure_holds_attempts_until_the_delay_passes() -> None:
    clock = FakeClock()
    backoff = Backoff(BackoffPolicy("tpm-reconnect", initial=2.0), "dev", clock)
    assert backoff.ready()
    backoff.record_failure("gone")
    assert not backoff.ready()
    assert backoff.waiting_message() == "retrying in 2.0 s (backoff tpm-reconnect)"
    clock.now += 2.0
    assert backoff.ready()


def test_success_resets_the_delay() -> None:
    clock = FakeClock()
    backoff = Backoff(BackoffPolicy("p", initial=1.0), "dev", clock)
    backoff.record_failure("gone")
    clock.now += 1.0
    backoff.record_failure("gone")
    backoff.record_success()
    assert (backoff.failures, backoff.ready()) == (0, True)
    assert backoff.record_failure("gone") == 1.0


def test_each_transition_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    backoff = Backoff(BackoffPolicy("p"), "tpmkms:name=k", clock)
    with caplog.at_level(logging.INFO, logger="kmsproxy.backoff"):
        for _ in range(5):
            backoff.record_failure("connection refused")
            clock.now += backoff.seconds_until_ready()
        backoff.record_success()
        backoff.record_success()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(
        "store unavailable: tpmkms:name=k: connection refused"
    )
    assert messages[1] == "store available again: tpmkms:name=k after 5 failed attempts"


def test_one_failure_is_singular(caplog: pytest.LogCaptureFixture) -> None:
    backoff = Backoff(BackoffPolicy("p"), "tpmkms:name=k", FakeClock())
    with caplog.at_level(logging.INFO, logger="kmsproxy.backoff"):
        backoff.record_failure("connection refused")
        backoff.record_success()
    message = caplog.records[-1].getMessage()
    assert message == "store available again: tpmkms:name=k after 1 failed attempt"


def test_failures_during_hold_are_one_outage() -> None:
    clock = FakeClock()
    backoff = Backoff(BackoffPolicy("p", initial=1.0, maximum=30.0), "dev", clock)
    delays = [backoff.record_failure("timed out") for _ in range(10)]
    assert delays == [1.0] * 10
    assert backoff.failures == 1
    assert backoff.seconds_until_ready() == 1.0


def test_failure_after_hold_doubles() -> None:
    clock = FakeClock()
    backoff = Backoff(BackoffPolicy("p", initial=1.0, maximum=30.0), "dev", clock)
    backoff.record_failure("timed out")
    clock.now += 0.5
    assert backoff.record_failure("timed out") == 0.5
    clock.now += 0.5
    assert backoff.record_failure("timed out") == 2.0
    assert backoff.failures == 2
