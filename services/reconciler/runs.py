"""A reconciliation run: ask the provider about payments webhooks left unsettled.

One run at a time across every replica: a run holds a PostgreSQL advisory lock on its
own connection for its whole duration (the lock dies with the connection, so a crashed
run never blocks the next). A run asked for while another holds the lock is recorded
as `skipped`.

The run walks payments that have been `pending` or `processing` for longer than the
minimum age, oldest first, in batches, asking the provider with bounded concurrency.
What it learns about a batch goes through the shared state machine (source
`reconciler`) in one transaction, with the run's item rows: one statement moves the
batch's payments, one records the items. A webhook that lands meanwhile simply wins and
the reconciler's late verdict is refused, not applied.

- the provider has a charge: the payment follows it (processing, completed, failed);
- the provider never saw the payment: submitted again (idempotently, under the payment
  id) while it is young; marked failed with the reason once it is too old;
- the provider cannot be reached: the payment is left alone and the error recorded; the
  run ends `partial`, and the next run tries again.

Then the refunds still pending past the same age (services.reconciler.refund_runs), counted
in the same run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
import uuid
from typing import Any

from libs.common.cancellation import claim_for_charging
from libs.common.db import Connection, Database
from libs.common.messages import Envelope
from libs.common.payments_store import (
    CHARGE_OUTCOME,
    Unsettled,
    charge_transition,
    unsettled_batch,
)
from libs.common.provider_client import (
    Charge,
    ProviderClient,
    ProviderRejected,
    ProviderUnavailable,
)
from libs.common.reconciler_store import (
    INBOX,
    Item,
    RunSummary,
    Trigger,
    close_interrupted,
    record_items,
    record_run,
)
from libs.common.state_machine import TransitionRequest, apply_transitions
from libs.common.states import PaymentStatus, TransitionSource
from services.reconciler.metrics import (
    LAST_SUCCESSFUL_RUN,
    PAYMENTS_SETTLED,
    RUN_DURATION,
    RUNS,
)
from services.reconciler.refund_runs import settle_stale_refunds

log = logging.getLogger(__name__)

# Any fixed 64-bit number, the same in every replica: "the reconciler is running".
ADVISORY_LOCK_KEY = 0x5EC0_4C11_E000_0001


@dataclasses.dataclass(frozen=True, slots=True)
class RunPolicy:
    min_age_seconds: int
    resubmit_max_age_seconds: int
    batch_size: int = 500
    concurrency: int = 20


class Reconciler:
    def __init__(self, db: Database, provider: ProviderClient, policy: RunPolicy) -> None:
        self.db = db
        self.provider = provider
        self.policy = policy

    async def run(
        self,
        *,
        trigger: Trigger,
        run_id: uuid.UUID | None = None,
        request: Envelope[Any] | None = None,
    ) -> RunSummary:
        """One run; `request` is the message that asked for it, claimed in the inbox in
        the transaction that records the run as over."""
        summary = RunSummary(run_id or uuid.uuid4(), trigger)
        started = time.perf_counter()
        async with self.db.pool.acquire(timeout=self.db.acquire_timeout) as lock_conn:
            if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY):
                summary.status = "skipped"
                await self._record(summary, finished=True, request=request)
                RUNS.labels(trigger=trigger, outcome="skipped").inc()
                log.info("reconciliation skipped: another run holds the lock")
                return summary
            try:
                await self._record(summary, finished=False)
                try:
                    await self._walk(summary)
                    await self._walk_refunds(summary)
                    summary.status = "partial" if summary.errors else "completed"
                except Exception as exc:
                    log.exception("reconciliation run failed")
                    summary.status = "failed"
                    summary.add_error("", f"run failed: {exc!r}")
                summary.duration_ms = int((time.perf_counter() - started) * 1000)
                await self._record(summary, finished=True, request=request)
            finally:
                await lock_conn.fetchval("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)

        RUNS.labels(trigger=trigger, outcome=summary.status).inc()
        RUN_DURATION.observe(summary.duration_ms / 1000)
        if summary.status == "completed":
            LAST_SUCCESSFUL_RUN.set_to_current_time()
        log.info(
            "reconciliation finished",
            extra={
                "run_id": str(summary.run_id),
                "status": summary.status,
                "checked": summary.checked,
                "updated": summary.updated,
                "errors": summary.errors,
                "duration_ms": summary.duration_ms,
            },
        )
        return summary

    async def _walk(self, summary: RunSummary) -> None:
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.policy.min_age_seconds)
        gate = asyncio.Semaphore(self.policy.concurrency)

        async def check(candidate: Unsettled) -> _Move | None:
            async with gate:
                return await self._check(summary, candidate)

        position: tuple[dt.datetime, uuid.UUID] | None = None
        while True:
            batch, position = await self._next_batch(cutoff, position)
            if not batch:
                return

            # A TaskGroup, not gather: if one check fails unexpectedly, the others are
            # cancelled before the run is recorded as failed and its lock released, so no
            # orphaned check goes on asking the provider after the run is over.
            async with asyncio.TaskGroup() as group:
                checks = [group.create_task(check(candidate)) for candidate in batch]
            await self._settle(summary, [move for c in checks if (move := c.result())])

    async def _walk_refunds(self, summary: RunSummary) -> None:
        def count(outcome: str, error: str | None) -> None:
            summary.checked += 1
            if outcome == "updated":
                summary.updated += 1
            elif outcome == "unchanged":
                summary.unchanged += 1
            else:
                summary.add_error("", error or outcome)

        await settle_stale_refunds(
            self.db,
            self.provider,
            run_id=summary.run_id,
            min_age_seconds=self.policy.min_age_seconds,
            batch_size=self.policy.batch_size,
            concurrency=self.policy.concurrency,
            count=count,
        )

    async def _next_batch(
        self, cutoff: dt.datetime, after: tuple[dt.datetime, uuid.UUID] | None
    ) -> tuple[list[Unsettled], tuple[dt.datetime, uuid.UUID] | None]:
        batch = await unsettled_batch(
            self.db, created_before=cutoff, after=after, limit=self.policy.batch_size
        )
        last = (batch[-1].created_at, batch[-1].id) if batch else after
        return batch, last

    async def _check(self, summary: RunSummary, payment: Unsettled) -> _Move | None:
        """The move the provider's answer calls for, if any."""
        summary.checked += 1
        try:
            target, reason, charge = await self._verdict(payment)
        except (ProviderUnavailable, ProviderRejected) as exc:
            summary.add_error(str(payment.id), str(exc))
            return None
        if target is None or target is payment.status:
            summary.unchanged += 1
            return None
        return _Move(payment, target, reason, charge)

    async def _settle(self, summary: RunSummary, moves: list[_Move]) -> None:
        if not moves:
            return
        applied = await self.db.transaction(lambda conn: _apply(conn, summary.run_id, moves))
        for move, done in zip(moves, applied, strict=True):
            if done:
                summary.updated += 1
                PAYMENTS_SETTLED.labels(to_status=move.target.value).inc()
            else:
                summary.unchanged += 1

    async def _verdict(self, payment: Unsettled) -> tuple[PaymentStatus | None, str, Charge | None]:
        """What the payment's status should be, according to the provider."""
        charges = await self.provider.find_charges(payment.id)
        if charges:
            charge = charges[0]
            reason = f"provider charge {charge.id} is {charge.status}"
            return CHARGE_OUTCOME[charge.status], reason, charge
        if payment.age_seconds > self.policy.resubmit_max_age_seconds:
            return (
                PaymentStatus.FAILED,
                f"provider has no charge after {int(payment.age_seconds)} s",
                None,
            )
        # Claimed first, as the payments service does: a payment canceled since it was
        # read is not submitted.
        claimed = await self.db.statement(lambda conn: claim_for_charging(conn, [payment.id]))
        if payment.id not in claimed:
            return None, "no longer pending", None
        charge = await self.provider.create_charge(
            payment_id=payment.id,
            reference=payment.reference,
            amount_minor=payment.amount_minor,
            currency=payment.currency,
            customer_id=payment.customer_id,
        )
        return (
            CHARGE_OUTCOME[charge.status],
            f"resubmitted: provider charge {charge.id} is {charge.status}",
            charge,
        )

    async def _record(
        self, summary: RunSummary, *, finished: bool, request: Envelope[Any] | None = None
    ) -> None:
        async def record(conn: Connection) -> None:
            await record_run(conn, summary, finished=finished)
            if summary.status == "skipped":
                # A redelivered request found the lock taken: if its own first attempt
                # left the run `running`, that attempt died with its process; say so rather
                # than leave it. (Should it still be alive after all, its final write
                # replaces this.)
                await close_interrupted(conn, summary.run_id)
            if request is not None:
                await INBOX.claim(conn, request)

        await self.db.transaction(record)


@dataclasses.dataclass(frozen=True, slots=True)
class _Move:
    payment: Unsettled
    target: PaymentStatus
    reason: str
    charge: Charge | None


async def _apply(conn: Connection, run_id: uuid.UUID, moves: list[_Move]) -> list[bool]:
    """Make the moves (one statement) and record the applied ones as the run's items."""
    transitions = await apply_transitions(conn, [_request(run_id, move) for move in moves])
    await record_items(
        conn,
        run_id,
        [
            Item(m.payment.id, t.from_status, m.target.value, m.reason)
            for m, t in zip(moves, transitions, strict=True)
            if t.applied and t.from_status is not None
        ],
    )
    return [t.applied for t in transitions]


def _request(run_id: uuid.UUID, move: _Move) -> TransitionRequest:
    reason = f"reconciliation {run_id}: {move.reason}"
    if move.charge is not None:
        return charge_transition(
            move.payment.id, move.charge, source=TransitionSource.RECONCILER, reason=reason
        )
    # The provider never saw it: the only verdict without a charge is `failed`.
    return TransitionRequest(
        move.payment.id,
        move.target,
        TransitionSource.RECONCILER,
        reason=reason,
        failure_reason=move.reason if move.target is PaymentStatus.FAILED else None,
    )
