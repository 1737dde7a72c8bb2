"""The service skeleton's process-wide setup."""

from __future__ import annotations

import asyncio
import gc
import time

from aiohttp import web

from libs.common.web import background_context, freeze_heap
from services.provider.wakeups import Wakeups
from tests.support import eventually


async def test_freezing_the_heap_leaves_what_lives_out_of_later_collections() -> None:
    kept = [object() for _ in range(1000)]
    gc.unfreeze()
    try:
        await freeze_heap(web.Application())
        assert gc.get_freeze_count() >= len(kept)
        # A cycle made after the freeze is still collected.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()


async def test_a_background_loop_runs_as_soon_as_it_is_woken() -> None:
    rounds: list[float] = []
    wake = asyncio.Event()
    woken = asyncio.Event()

    async def round_of_work() -> int:
        rounds.append(time.monotonic())
        if len(rounds) > 1:
            woken.set()
        return 0

    app = web.Application()
    key: web.AppKey[asyncio.Task[None]] = web.AppKey("loop")
    # The poll is ten minutes: only the wake-up can bring the second round within the test.
    app.cleanup_ctx.append(
        background_context(key, "test loop", round_of_work, batch_size=10, interval=600, wake=wake)
    )
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await eventually(lambda: len(rounds) == 1)
        wake.set()
        await asyncio.wait_for(woken.wait(), timeout=10)
        assert len(rounds) == 2
    finally:
        await runner.cleanup()


async def test_wakeups_falling_due_in_one_slot_share_one_timer() -> None:
    wakeups = Wakeups()
    for _ in range(100):
        wakeups.settle_after(0.05)
    assert wakeups.pending() == 1
    await asyncio.wait_for(wakeups.settlement.wait(), timeout=10)
    assert wakeups.pending() == 0


async def test_a_long_delay_keeps_few_timers_pending() -> None:
    wakeups = Wakeups()
    # An hour's delay, with a charge every 10 ms of a minute: 6,000 charges.
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(6000):
        wakeups.settle_after(3600 - (loop.time() - started) + n * 0.01)
    assert wakeups.pending() <= 3
