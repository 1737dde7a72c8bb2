"""The gateway's rate limits, on a clock the test controls."""

from __future__ import annotations

import time

import pytest

from libs.common.errors import ApiError
from services.gateway.access import RateLimits

# Just before a minute boundary, where a fixed window would hand out a fresh allowance.
BEFORE_BOUNDARY = 60 * 30_000_000 - 1.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock(BEFORE_BOUNDARY)
    monkeypatch.setattr(time, "time", clock)
    return clock


async def statuses(limits: RateLimits, count: int) -> list[int]:
    answers = []
    for _ in range(count):
        try:
            await limits.admit("key:1")
            answers.append(200)
        except ApiError as exc:
            answers.append(exc.status)
    return answers


async def test_past_the_limit_the_answer_is_429_with_retry_after(clock: Clock) -> None:
    limits = RateLimits("3/minute", "3/minute")
    assert await statuses(limits, 3) == [200, 200, 200]
    with pytest.raises(ApiError) as refused:
        await limits.admit("key:1")
    assert refused.value.status == 429
    assert refused.value.code == "rate_limited"
    assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
    # Each client has its own allowance.
    await limits.admit("key:2")


async def test_a_new_window_does_not_hand_out_a_fresh_allowance(clock: Clock) -> None:
    limits = RateLimits("4/minute", "3/minute")
    assert await statuses(limits, 5) == [200, 200, 200, 200, 429]
    clock.now += 2  # into the next minute, where the last one still counts almost in full
    assert (await statuses(limits, 4)).count(200) <= 1
    clock.now += 60  # a whole window later, all of it again
    assert await statuses(limits, 5) == [200, 200, 200, 200, 429]
