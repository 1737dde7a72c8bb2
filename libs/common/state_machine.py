"""The one function that changes a payment's status.

Every service (payments, webhooks, reconciler) moves payments only through
`apply_transition`, inside the caller's transaction. It is a single SQL statement: lock
the row, update it only if the move is allowed from its current status, and append an
audit row saying what was asked, by whom, and whether it was applied or refused. Two
concurrent moves of one payment serialize on the row lock, and the second one sees the
first one's result, so a late or duplicate event can never move a payment backwards.
"""

from __future__ import annotations

import dataclasses
import uuid

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


_TRANSITION_SQL = """
WITH current AS (
    SELECT id, status FROM payments.payments WHERE id = $1 FOR UPDATE
), moved AS (
    UPDATE payments.payments AS p
       SET status = $2::text,
           provider = COALESCE($3::text, p.provider),
           provider_reference = COALESCE($4::text, p.provider_reference),
           failure_reason = COALESCE($5::text, p.failure_reason)
      FROM current
     WHERE p.id = current.id AND current.status = ANY($6::text[])
    RETURNING p.id
), audit AS (
    INSERT INTO payments.payment_events
        (payment_id, from_status, to_status, applied, source, reason, correlation_id)
    SELECT current.id, current.status, $2::text, EXISTS (SELECT 1 FROM moved), $7::text,
           CASE WHEN EXISTS (SELECT 1 FROM moved) THEN $8::text
                ELSE concat_ws('; ', 'refused: not allowed from ' || current.status, $8::text)
           END,
           $9::text
      FROM current
)
SELECT current.status AS from_status, EXISTS (SELECT 1 FROM moved) AS applied FROM current
"""


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
    """Move `payment_id` to `to_status` if allowed; record the attempt either way.

    Must run inside the caller's transaction, so the audit row and whatever else the
    caller writes (inbox entry, webhook event) commit or roll back together.
    """
    row = await conn.fetchrow(
        _TRANSITION_SQL,
        payment_id,
        to_status.value,
        provider,
        provider_reference,
        failure_reason,
        [s.value for s in ALLOWED_FROM[to_status]],
        source.value,
        reason,
        get_correlation_id(),
    )
    if row is None:
        return Transition(payment_id, to_status, from_status=None, applied=False)
    applied: bool = row["applied"]
    PAYMENT_TRANSITIONS.labels(
        source=source.value, to_status=to_status.value, outcome="applied" if applied else "refused"
    ).inc()
    return Transition(payment_id, to_status, PaymentStatus(row["from_status"]), applied)


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
