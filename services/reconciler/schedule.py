"""Running reconciliations on RECONCILE_CRON (UTC), and keeping the backlog gauge current."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from croniter import croniter

from libs.common.db import Database
from libs.common.payments_store import oldest_unsettled_ages
from libs.common.reconciler_store import last_completed_at
from libs.common.refunds import oldest_pending_age
from libs.common.states import PaymentStatus
from services.reconciler.metrics import (
    LAST_SUCCESSFUL_RUN,
    OLDEST_PENDING_REFUND_AGE,
    OLDEST_UNSETTLED_AGE,
)

log = logging.getLogger(__name__)


def seconds_until_next(expression: str, now: dt.datetime) -> float:
    following: dt.datetime = croniter(expression, now).get_next(dt.datetime)
    return max(0.0, (following - now).total_seconds())


async def run_on_schedule(expression: str, run: Callable[[], Awaitable[object]]) -> None:
    """Call `run` at every time `expression` names, forever. A slow run skips missed times."""
    while True:
        await asyncio.sleep(seconds_until_next(expression, dt.datetime.now(dt.UTC)))
        try:
            await run()
        except Exception:
            # The next scheduled time tries again; the run itself recorded what it could.
            log.exception("scheduled reconciliation failed")


async def measure_backlog(db: Database) -> int:
    """Set the backlog gauges from the database, so every replica reports the same truth.

    Returns 0: one round is always enough."""
    last_success = await last_completed_at(db)
    if last_success is not None:
        LAST_SUCCESSFUL_RUN.set(last_success)
    ages = await oldest_unsettled_ages(db)
    for status in (PaymentStatus.PENDING, PaymentStatus.PROCESSING):
        OLDEST_UNSETTLED_AGE.labels(status=status.value).set(ages.get(status, 0.0))
    OLDEST_PENDING_REFUND_AGE.set(await oldest_pending_age(db))
    return 0
