"""The bench's load client keeps its own pauses out of what it measures."""

from __future__ import annotations

import asyncio
import gc

import pytest

from bench.load import client_never_pauses


async def test_the_collector_is_off_while_any_load_runs_and_on_after_the_last() -> None:
    assert gc.isenabled()
    seen: list[bool] = []

    @client_never_pauses
    async def load(seconds: float) -> float:
        seen.append(gc.isenabled())
        await asyncio.sleep(seconds)
        seen.append(gc.isenabled())
        return seconds

    # The short load ends while the long one still runs: the collector stays off.
    assert await asyncio.gather(load(0.05), load(0.01)) == [0.05, 0.01]
    assert seen == [False, False, False, False]
    assert gc.isenabled()


async def test_a_failed_load_turns_the_collector_back_on() -> None:
    @client_never_pauses
    async def load() -> None:
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        await load()
    assert gc.isenabled()
