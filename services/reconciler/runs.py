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
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
import uuid
from typing import Literal

from libs.common.db import Connection, Database
from libs.common.logs import get_correlation_id
from libs.common.provider_client import (
    PROVIDER_NAME,
    Charge,
    ProviderClient,
    ProviderRejected,
    ProviderUnavailable,
)
from libs.common.state_machine import TransitionRequest, apply_transitions
from libs.common.states import PaymentStatus, TransitionSource
from services.reconciler.metrics import (
    LAST_SUCCESSFUL_RUN,
    PAYMENTS_SETTLED,
    RUN_DURATION,
    RUNS,
)

log = logging.getLogger(__name__)

# Any fixed 64-bit number, the same in every replica: "the reconciler is running".
ADVISORY_LOCK_KEY = 0x5EC0_4C11_E000_0001
MAX_ERROR_DETAILS = 100

Trigger = Literal["cron", "manual"]

_CHARGE_TO_STATUS = {
    "processing": PaymentStatus.PROCESSING,
    "succeeded": PaymentStatus.COMPLETED,
    "declined": PaymentStatus.FAILED,
}


@dataclasses.dataclass(frozen=True, slots=True)
class RunPolicy:
    min_age_seconds: int
    resubmit_max_age_seconds: int
    batch_size: int = 500
    concurrency: int = 20


@dataclasses.dataclass
class RunSummary:
    run_id: uuid.UUID
    trigger: Trigger
    status: str = "running"
    checked: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: int = 0
    # The first MAX_ERROR_DETAILS errors, each with the payment it concerns.
    error_details: list[dict[str, str]] = dataclasses.field(default_factory=list)
    duration_ms: int = 0

    def add_error(self, payment_id: str, error: str) -> None:
        self.errors += 1
        if len(self.error_details) < MAX_ERROR_DETAILS:
            self.error_details.append({"payment_id": payment_id, "error": error})


@dataclasses.dataclass(frozen=True, slots=True)
class _Candidate:
    id: uuid.UUID
    reference: str
    status: PaymentStatus
    amount_minor: int
    currency: str
    customer_id: str
    age_seconds: float


async def finished_before(db: Database, run_id: uuid.UUID) -> bool:
    """Whether this run already ran to the end (a redelivered request must not rerun it)."""
    row = await db.fetchrow(
        "SELECT 1 FROM reconciler.reconciliation_logs WHERE id = $1 AND finished_at IS NOT NULL",
        run_id,
    )
    return row is not None


class Reconciler:
    def __init__(self, db: Database, provider: ProviderClient, policy: RunPolicy) -> None:
        self.db = db
        self.provider = provider
        self.policy = policy

    async def run(self, *, trigger: Trigger, run_id: uuid.UUID | None = None) -> RunSummary:
        summary = RunSummary(run_id or uuid.uuid4(), trigger)
        started = time.perf_counter()
        async with self.db.pool.acquire(timeout=self.db.acquire_timeout) as lock_conn:
            if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY):
                summary.status = "skipped"
                await self._record(summary, finished=True)
                await self._close_interrupted(summary.run_id)
                RUNS.labels(trigger=trigger, outcome="skipped").inc()
                log.info("reconciliation skipped: another run holds the lock")
                return summary
            try:
                await self._record(summary, finished=False)
                try:
                    await self._walk(summary)
                    summary.status = "partial" if summary.errors else "completed"
                except Exception as exc:
                    log.exception("reconciliation run failed")
                    summary.status = "failed"
                    summary.add_error("", f"run failed: {exc!r}")
                summary.duration_ms = int((time.perf_counter() - started) * 1000)
                await self._record(summary, finished=True)
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

        async def check(candidate: _Candidate) -> _Move | None:
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

    async def _next_batch(
        self, cutoff: dt.datetime, after: tuple[dt.datetime, uuid.UUID] | None
    ) -> tuple[list[_Candidate], tuple[dt.datetime, uuid.UUID] | None]:
        rows = await self.db.fetch(
            """
            SELECT id, reference, status, amount_minor, currency, customer_id, created_at,
                   extract(epoch FROM now() - created_at) AS age_seconds
              FROM payments.payments
             WHERE status IN ('pending', 'processing')
               AND created_at < $1
               AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))
             ORDER BY created_at, id
             LIMIT $4
            """,
            cutoff,
            after[0] if after else None,
            after[1] if after else None,
            self.policy.batch_size,
        )
        batch = [
            _Candidate(
                id=row["id"],
                reference=row["reference"],
                status=PaymentStatus(row["status"]),
                amount_minor=row["amount_minor"],
                currency=row["currency"],
                customer_id=row["customer_id"],
                age_seconds=float(row["age_seconds"]),
            )
            for row in rows
        ]
        last = (rows[-1]["created_at"], rows[-1]["id"]) if rows else after
        return batch, last

    async def _check(self, summary: RunSummary, payment: _Candidate) -> _Move | None:
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

    async def _verdict(
        self, payment: _Candidate
    ) -> tuple[PaymentStatus | None, str, Charge | None]:
        """What the payment's status should be, according to the provider."""
        charges = await self.provider.find_charges(payment.id)
        if charges:
            charge = charges[0]
            reason = f"provider charge {charge.id} is {charge.status}"
            return _CHARGE_TO_STATUS[charge.status], reason, charge
        if payment.age_seconds > self.policy.resubmit_max_age_seconds:
            return (
                PaymentStatus.FAILED,
                f"provider has no charge after {int(payment.age_seconds)} s",
                None,
            )
        charge = await self.provider.create_charge(
            payment_id=payment.id,
            reference=payment.reference,
            amount_minor=payment.amount_minor,
            currency=payment.currency,
            customer_id=payment.customer_id,
        )
        return (
            _CHARGE_TO_STATUS[charge.status],
            f"resubmitted: provider charge {charge.id} is {charge.status}",
            charge,
        )

    async def _close_interrupted(self, run_id: uuid.UUID) -> None:
        """A redelivered request found the lock taken: if its own first attempt left the
        run `running`, that attempt died with its process; say so rather than leave it.

        (Should that attempt still be alive after all, its final write replaces this.)"""
        await self.db.transaction(
            lambda conn: conn.execute(
                """
                UPDATE reconciler.reconciliation_logs
                   SET status = 'failed', finished_at = now(), errors = errors + 1,
                       error_details = error_details || jsonb_build_array(jsonb_build_object(
                           'payment_id', '',
                           'error', 'interrupted: the process running it stopped, and when'
                                    ' the request came back another run was in progress'))
                 WHERE id = $1 AND status = 'running'
                """,
                run_id,
            )
        )

    async def _record(self, summary: RunSummary, *, finished: bool) -> None:
        await self.db.transaction(
            lambda conn: conn.execute(
                """
                INSERT INTO reconciler.reconciliation_logs
                    (id, trigger, status, checked, updated, unchanged, errors, error_details,
                     duration_ms, correlation_id, finished_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                        CASE WHEN $11 THEN now() END)
                ON CONFLICT (id) DO UPDATE
                   SET status = EXCLUDED.status, checked = EXCLUDED.checked,
                       updated = EXCLUDED.updated, unchanged = EXCLUDED.unchanged,
                       errors = EXCLUDED.errors, error_details = EXCLUDED.error_details,
                       duration_ms = EXCLUDED.duration_ms, finished_at = EXCLUDED.finished_at
                 WHERE EXCLUDED.status <> 'skipped'
                """,
                summary.run_id,
                summary.trigger,
                summary.status,
                summary.checked,
                summary.updated,
                summary.unchanged,
                summary.errors,
                summary.error_details,
                summary.duration_ms if finished else None,
                get_correlation_id(),
                finished,
            )
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _Move:
    payment: _Candidate
    target: PaymentStatus
    reason: str
    charge: Charge | None


_ITEMS_SQL = """
INSERT INTO reconciler.reconciliation_items (run_id, payment_id, from_status, to_status, reason)
SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[])
"""


async def _apply(conn: Connection, run_id: uuid.UUID, moves: list[_Move]) -> list[bool]:
    """Make the moves (one statement) and record the applied ones as the run's items."""
    transitions = await apply_transitions(
        conn,
        [
            TransitionRequest(
                move.payment.id,
                move.target,
                TransitionSource.RECONCILER,
                reason=f"reconciliation {run_id}: {move.reason}",
                provider=PROVIDER_NAME if move.charge else None,
                provider_reference=move.charge.id if move.charge else None,
                failure_reason=(move.charge.decline_reason if move.charge else move.reason)
                if move.target is PaymentStatus.FAILED
                else None,
            )
            for move in moves
        ],
    )
    applied = [(m, t) for m, t in zip(moves, transitions, strict=True) if t.applied]
    if applied:
        await conn.execute(
            _ITEMS_SQL,
            run_id,
            [m.payment.id for m, _ in applied],
            [t.from_status for _, t in applied],
            [m.target.value for m, _ in applied],
            [m.reason for m, _ in applied],
        )
    return [t.applied for t in transitions]
