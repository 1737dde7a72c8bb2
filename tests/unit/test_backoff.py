"""The one retry delay every retry loop uses."""

from __future__ import annotations

from libs.common.backoff import Backoff


def test_the_delay_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(base_seconds=0.5, cap_seconds=3.0)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_very_long_run_of_failures_stays_at_the_cap() -> None:
    assert Backoff(base_seconds=1.0, cap_seconds=60.0).delay(10_000) == 60.0


def test_jitter_spreads_the_delay_around_its_nominal_value() -> None:
    backoff = Backoff(base_seconds=1.0, cap_seconds=10.0, jitter=1.0)
    delays = [backoff.delay(2) for _ in range(500)]
    assert all(1.0 <= d < 3.0 for d in delays)
    assert len(set(delays)) > 400


def test_the_schedule_lists_the_unjittered_delays_by_failure_count() -> None:
    backoff = Backoff(base_seconds=2.0, cap_seconds=300.0, jitter=0.5)
    assert backoff.schedule(10) == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
