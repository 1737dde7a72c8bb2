"""The service skeleton's process-wide setup."""

from __future__ import annotations

import gc

from aiohttp import web

from libs.common.web import freeze_heap


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
