"""The refunds part of a reconciliation run: settle refunds whose webhook never came.

A refund still `pending` past the minimum age is looked up at the provider under its id:

- the provider settled it: the refund takes that outcome (which moves its payment if it
  succeeded), through the same function as the webhook, so whichever comes second
  changes nothing;
- the provider is still processing it: left alone (its provider refund id recorded);
- the provider never saw it (the consumer died before asking, or the gateway died before
  publishing): it is submitted now, claimed first, under its id, as the payments service
  would have;
- the provider cannot be reached: left alone, the error counted; the next run tries again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Callable

from libs.common.db import Connection, Database
from libs.common.provider_client import ProviderClient, ProviderRejected, ProviderUnavailable
from libs.common.reconciler_store import Item, record_items
from libs.common.refund_submission import record, submit
from libs.common.refunds import Settled, Unsettled, claim_submission, settle_refund, unsettled
from libs.common.states import TransitionSource
from services.reconciler.metrics import REFUNDS_SETTLED

log = logging.getLogger(__name__)


async def settle_stale_refunds(
    db: Database,
    provider: ProviderClient,
    *,
    run_id: uuid.UUID,
    min_age_seconds: int,
    batch_size: int,
    concurrency: int,
    count: Callable[[str, str | None], None],
) -> None:
    """Walk the stale pending refunds; `count(outcome, error)` is told about each one
    (outcome: updated, unchanged or error)."""
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=min_age_seconds)
    gate = asyncio.Semaphore(concurrency)

    async def one(refund: Unsettled) -> None:
        async with gate:
            try:
                outcome = await _reconcile(db, provider, run_id, refund)
            except (ProviderUnavailable, ProviderRejected) as exc:
                count("error", f"refund {refund.refund_id}: {exc}")
                return
            count(outcome, None)

    position: tuple[dt.datetime, uuid.UUID] | None = None
    while True:
        page, position = await unsettled(db, older_than=cutoff, after=position, limit=batch_size)
        if not page:
            return
        async with asyncio.TaskGroup() as group:
            for refund in page:
                group.create_task(one(refund))


async def _reconcile(
    db: Database, provider: ProviderClient, run_id: uuid.UUID, refund: Unsettled
) -> str:
    found = await provider.find_refunds(refund.refund_id)
    if not found:
        claimed = await db.statement(lambda conn: claim_submission(conn, refund.refund_id))
        if claimed is None:
            return "unchanged"
        outcome = await submit(db, provider, claimed, source=TransitionSource.RECONCILER)
        if outcome == "unavailable":
            raise ProviderUnavailable(f"refund {refund.refund_id} could not be submitted")
        log.info(
            "refund resubmitted",
            extra={"refund_id": str(refund.refund_id), "outcome": outcome},
        )
        return "updated"
    answer = found[0]
    if answer.status == "processing":
        claimed = await db.statement(lambda conn: claim_submission(conn, refund.refund_id))
        if claimed is not None:
            await record(db, claimed, answer, source=TransitionSource.RECONCILER)
        return "unchanged"
    reason = f"reconciliation {run_id}: provider refund {answer.id} is {answer.status}"

    async def settle(conn: Connection) -> Settled:
        settled = await settle_refund(
            conn,
            refund.refund_id,
            succeeded=answer.status == "succeeded",
            source=TransitionSource.RECONCILER,
            reason=reason,
            failure_reason=answer.failure_reason,
            provider_refund_id=answer.id,
        )
        moved = settled.transition
        if moved is not None and moved.applied and moved.from_status is not None:
            await record_items(
                conn,
                run_id,
                [Item(moved.payment_id, moved.from_status.value, moved.to_status.value, reason)],
            )
        return settled

    settled = await db.transaction(settle)
    if not settled.applied:
        return "unchanged"
    REFUNDS_SETTLED.labels(status=answer.status).inc()
    return "updated"
