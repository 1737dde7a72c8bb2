"""The statements that create payments and change their status.

Every service (payments, webhooks, reconciler) creates payments only through
`create_payments` and moves them only through `apply_transitions`, inside the caller's
transaction or as a statement of its own. Each is a single SQL statement: lock the rows,
update each only if the move is allowed from its current status, and append an audit row
per move saying what was asked, by whom, and whether it was applied or refused; and put
the event of every move applied (creation included) in the outbox, numbered by the
payment's event sequence (`_EVENTS_CTE`, see libs/common/outbox.py), so an event commits
exactly when its move does and a refused move has none. They are the only writes on the
payments schema besides its inbox, the relay's marking of published events, its refunds
(`libs.common.refunds`) and the charge claim (`libs.common.cancellation`), both of which
move payments through this module; reads are in `libs.common.payments_store`, and
`_AUDIT_CTE` is the only writer of its audit table.

Two concurrent moves of one payment serialize on the row lock, and the second one sees
the first one's result, so a late or duplicate event can never move a payment backwards.
Rows are locked in id order, so two batches touching the same payments cannot deadlock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from libs.common.db import Connection
from libs.common.logs import get_correlation_id
from libs.common.messages import payment_event_type
from libs.common.metrics import EVENTS_WRITTEN, PAYMENT_TRANSITIONS
from libs.common.outbox import insert_events_sql
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

# The one place that writes payments.payment_events. Every statement below decides its
# moves into a CTE named `recorded` (payment_id, from_status, to_status, applied, source,
# reason, correlation_id), one row per move applied or refused, and ends with this.
_AUDIT_CTE = """
audit AS (
    INSERT INTO payments.payment_events
        (payment_id, from_status, to_status, applied, source, reason, correlation_id)
    SELECT payment_id, from_status, to_status, applied, source, reason, correlation_id
      FROM recorded
)
"""

# The one place that writes events into payments.outbox: for each row of the CTE `applied`
# (the payment's columns as the move left them, its event_sequence already raised, plus
# previous_status, source, reason and correlation_id), the event payment.<new status>.
_EVENTS_CTE = "events AS (" + insert_events_sql("applied") + ")"

_TRANSITIONS_SQL = f"""
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
           failure_reason = COALESCE(d.failure_reason, p.failure_reason),
           event_sequence = p.event_sequence + 1
      FROM decided AS d
     WHERE p.id = d.payment_id AND d.allowed
    RETURNING p.*
), applied AS (
    SELECT moved.*, d.from_status AS previous_status, d.source, d.reason, d.correlation_id
      FROM moved JOIN decided AS d ON d.payment_id = moved.id
), {_EVENTS_CTE}, recorded AS (
    SELECT d.payment_id, d.from_status, d.to_status,
           d.payment_id IN (SELECT id FROM moved) AS applied, d.source,
           CASE WHEN d.payment_id IN (SELECT id FROM moved) THEN d.reason
                ELSE concat_ws('; ', 'refused: not allowed from ' || d.from_status, d.reason)
           END AS reason,
           d.correlation_id
      FROM decided AS d
), {_AUDIT_CTE}
SELECT payment_id, from_status, applied FROM recorded
"""  # noqa: S608 - a constant fragment, no input


# The same as the statement above for a single payment. One move at a time is the common
# case (the reconciler, the one-message path), and this plan, without the arrays, costs
# about half as much per move (docs/decisions/0001-performance.md).
_ONE_TRANSITION_SQL = f"""
WITH locked AS (
    SELECT id, status FROM payments.payments WHERE id = $1 FOR UPDATE
), moved AS (
    UPDATE payments.payments AS p
       SET status = $2::text,
           provider = COALESCE($3::text, p.provider),
           provider_reference = COALESCE($4::text, p.provider_reference),
           failure_reason = COALESCE($5::text, p.failure_reason),
           event_sequence = p.event_sequence + 1
      FROM locked
     WHERE p.id = locked.id AND locked.status = ANY($9::text[])
    RETURNING p.*
), applied AS (
    SELECT moved.*, locked.status AS previous_status, $6::text AS source,
           $7::text AS reason, $8::text AS correlation_id
      FROM moved, locked
), {_EVENTS_CTE}, recorded AS (
    SELECT locked.id AS payment_id, locked.status AS from_status, $2::text AS to_status,
           EXISTS (SELECT 1 FROM moved) AS applied, $6::text AS source,
           CASE WHEN EXISTS (SELECT 1 FROM moved) THEN $7::text
                ELSE concat_ws('; ', 'refused: not allowed from ' || locked.status, $7::text)
           END AS reason,
           $8::text AS correlation_id
      FROM locked
), {_AUDIT_CTE}
SELECT payment_id, from_status, applied FROM recorded
"""  # noqa: S608 - a constant fragment, no input

# Creation is the move from nothing to `pending`, recorded like every other one. A payment
# stored before (a redelivered or resent request) is left as it is and not recorded again.
_CREATE_SQL = f"""
WITH incoming AS (
    SELECT *
      FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                  $7::text[], $8::timestamptz[], $9::text[], $13::text[])
        AS i(id, reference, amount_minor, currency, customer_id, description, metadata,
             created_at, correlation_id, owner)
), inserted AS (
    INSERT INTO payments.payments
        (id, reference, amount_minor, currency, customer_id, description, metadata,
         created_at, updated_at, event_sequence, owner)
    SELECT id, reference, amount_minor, currency, customer_id, description, metadata::jsonb,
           COALESCE(created_at, now()), COALESCE(created_at, now()), 1, owner
      FROM incoming
    ON CONFLICT (id) DO NOTHING
    RETURNING *
), applied AS (
    -- The payment's first event, payment.pending, sequence 1.
    SELECT inserted.*, NULL::text AS previous_status, $11::text AS source,
           $12::text AS reason, incoming.correlation_id
      FROM inserted JOIN incoming USING (id)
), {_EVENTS_CTE}, recorded AS (
    SELECT incoming.id AS payment_id, NULL::text AS from_status, $10::text AS to_status,
           true AS applied, $11::text AS source, $12::text AS reason, incoming.correlation_id
      FROM incoming JOIN inserted USING (id)
), {_AUDIT_CTE}
SELECT incoming.id, inserted.id IS NOT NULL AS inserted,
       -- The statement's snapshot does not see its own inserts: those are pending.
       CASE WHEN inserted.id IS NOT NULL THEN $10::text ELSE stored.status END AS status
  FROM incoming
  LEFT JOIN inserted USING (id)
  LEFT JOIN payments.payments AS stored ON stored.id = incoming.id
"""  # noqa: S608 - a constant fragment, no input


@dataclasses.dataclass(frozen=True, slots=True)
class NewPayment:
    """A payment to create as `pending`."""

    id: uuid.UUID
    reference: str
    amount_minor: int
    currency: str
    customer_id: str
    description: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    # None is the statement's time.
    created_at: dt.datetime | None = None
    # The audit row's; None takes the current context's.
    correlation_id: str | None = None
    # The API key that made it: only it may refund or cancel it (None: any key may).
    owner: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Stored:
    status: PaymentStatus
    # False when the payment was stored before: this request is a redelivery or a resend.
    inserted: bool


async def create_payments(
    conn: Connection,
    payments: Sequence[NewPayment],
    *,
    source: TransitionSource,
    reason: str | None = None,
) -> dict[uuid.UUID, Stored]:
    """Store the new payments as `pending` with their creation audit rows (one statement).

    Every payment's status afterwards, by id. At most one entry per payment."""
    if not payments:
        return {}
    context_correlation_id = get_correlation_id()
    rows = await conn.fetch(
        _CREATE_SQL,
        [p.id for p in payments],
        [p.reference for p in payments],
        [p.amount_minor for p in payments],
        [p.currency for p in payments],
        [p.customer_id for p in payments],
        [p.description for p in payments],
        # As JSON text: the statement works on any connection, with or without a jsonb codec.
        [json.dumps(p.metadata) for p in payments],
        [p.created_at for p in payments],
        [p.correlation_id or context_correlation_id for p in payments],
        PaymentStatus.PENDING.value,
        source.value,
        reason,
        [p.owner for p in payments],
    )
    result = {row["id"]: Stored(PaymentStatus(row["status"]), row["inserted"]) for row in rows}
    created = sum(stored.inserted for stored in result.values())
    if created:
        PAYMENT_TRANSITIONS.labels(
            source=source.value, to_status=PaymentStatus.PENDING.value, outcome="applied"
        ).inc(created)
        EVENTS_WRITTEN.labels(type=payment_event_type(PaymentStatus.PENDING)).inc(created)
    return result


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
        if applied:
            EVENTS_WRITTEN.labels(type=payment_event_type(request.to_status)).inc()
        results.append(
            Transition(
                request.payment_id, request.to_status, PaymentStatus(row["from_status"]), applied
            )
        )
    return results
