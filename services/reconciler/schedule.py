"""Running reconciliations on RECONCILE_CRON (UTC), and keeping the backlog gauge current."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from croniter import croniter

from libs.common.db import Database
from services.reconciler.metrics import LAST_SUCCESSFUL_RUN, OLDEST_UNSETTLED_AGE

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
    last_success = await db.fetchrow(
        "SELECT extract(epoch FROM max(finished_at)) AS at FROM reconciler.reconciliation_logs"
        " WHERE status = 'completed'"
    )
    if last_success is not None and last_success["at"] is not None:
        LAST_SUCCESSFUL_RUN.set(float(last_success["at"]))
    rows = await db.fetch(
        """
        SELECT status, extract(epoch FROM now() - min(created_at)) AS age
          FROM payments.payments
         WHERE status IN ('pending', 'processing')
         GROUP BY status
        """
    )
    ages = {row["status"]: float(row["age"]) for row in rows}
    for status in ("pending", "processing"):
        OLDEST_UNSETTLED_AGE.labels(status=status).set(ages.get(status, 0.0))
    return 0
