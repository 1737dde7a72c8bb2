"""Bounded waits for shutdown paths: a SIGTERM must end the process in bounded time.

Every await on a shutdown path goes through `bounded` (or `stop_task` for a background
task), so a peer that never answers, or library code that swallows a cancellation, costs
at most the bound and a warning, never a hung process.

Why not `asyncio.wait_for` or `asyncio.timeout`: both end the wait by cancelling the
awaited code and then wait for it to let the cancellation through. On Python 3.11,
`asyncio.wait_for` itself swallows a cancellation that arrives just as the awaited future
completes (CPython gh-86296, fixed in 3.12), and aiormq runs every channel RPC through it,
so a cancelled RPC may return normally and the code around it carry on as if never
cancelled. `bounded` runs the work as a task of its own and waits with `asyncio.wait`,
which returns at the deadline whatever the task does; a task still running then is
cancelled once more and left behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger(__name__)


class Deadline:
    """One budget shared by the steps of a stop, so that their bounds add up to it."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def left(self, at_least: float = 0.5) -> float:
        """Seconds left; `at_least` so that a late step (closing a channel) still gets a try."""
        return max(self._at - time.monotonic(), at_least)


async def bounded(work: Awaitable[Any], seconds: float, what: str) -> bool:
    """Await `work` for at most `seconds`; True if it finished without raising.

    A failure or an overrun is logged with `what` and returns False: shutdown goes on
    with its next step either way."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        log.warning(
            "shutdown step did not finish in time", extra={"step": what, "after_s": seconds}
        )
        return False
    if task.cancelled():
        return True
    error = task.exception()
    if error is not None:
        log.warning("shutdown step failed", extra={"step": what, "error": repr(error)})
        return False
    return True


async def stop_task(task: asyncio.Task[Any] | None, seconds: float, what: str) -> bool:
    """Cancel `task` and wait at most `seconds` for it to end."""
    if task is None or task.done():
        return True
    task.cancel()
    if await bounded(_ended(task), seconds, what):
        return True
    # It let the cancellation pass without ending (see above): one more, and leave it.
    task.cancel()
    return False


async def _ended(task: asyncio.Task[Any]) -> None:
    # Wait for the end without propagating its outcome (a cancellation is the normal one).
    await asyncio.wait({task})
