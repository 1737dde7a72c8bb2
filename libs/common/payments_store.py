"""The payments schema's reads, and what a provider's charge means for a payment.

The payments service owns the `payments` schema; the other services read it only through
this module and write it only through `libs.common.state_machine` (creation and every
move, with its event), `libs.common.inbox` and `libs.common.outbox` (the relay marks
events published and prunes old ones). No service writes SQL on `payments.*` of its own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from asyncpg import Record

from libs.common.db import Connection, Database
from libs.common.inbox import Inbox
from libs.common.provider_client import PROVIDER_NAME, Charge
from libs.common.state_machine import TransitionRequest
from libs.common.states import PaymentStatus, TransitionSource

# The payments service's consumer of `payment.requested` claims its messages here in the
# transaction that stores their payments.
INBOX = Inbox("payments", "payments.payment-requested")

# What the provider's charge status means for the payment.
CHARGE_OUTCOME = {
    "processing": PaymentStatus.PROCESSING,
    "succeeded": PaymentStatus.COMPLETED,
    "declined": PaymentStatus.FAILED,
}


def charge_transition(
    payment_id: uuid.UUID,
    charge: Charge,
    *,
    source: TransitionSource,
    reason: str,
    correlation_id: str | None = None,
) -> TransitionRequest:
    """The move a charge's status calls for, recording the charge on the payment."""
    target = CHARGE_OUTCOME[charge.status]
    return TransitionRequest(
        payment_id,
        target,
        source,
        reason=reason,
        provider=PROVIDER_NAME,
        provider_reference=charge.id,
        failure_reason=charge.decline_reason if target is PaymentStatus.FAILED else None,
        correlation_id=correlation_id,
    )


# --- one payment, with its history (the gateway) -------------------------------------------

PAYMENT_COLUMNS = (
    "id, reference, status, amount_minor, currency, customer_id, description, metadata,"
    " provider, provider_reference, failure_reason, created_at, updated_at"
)


async def payment_with_events(
    conn: Connection, payment_id: uuid.UUID
) -> tuple[Record, list[Record]] | None:
    """The payment and its audit rows, oldest first; None when there is no such payment.

    Run it in a transaction, so both reads see the same moment."""
    row = await conn.fetchrow(
        f"SELECT {PAYMENT_COLUMNS} FROM payments.payments WHERE id = $1",  # noqa: S608 - constant columns
        payment_id,
    )
    if row is None:
        return None
    events = await conn.fetch(
        "SELECT from_status, to_status, applied, source, reason, created_at"
        " FROM payments.payment_events WHERE payment_id = $1 ORDER BY id",
        payment_id,
    )
    return row, events


async def status_of(conn: Connection, payment_id: uuid.UUID) -> PaymentStatus | None:
    """The payment's status; None when there is no such payment."""
    status: str | None = await conn.fetchval(
        "SELECT status FROM payments.payments WHERE id = $1", payment_id
    )
    return None if status is None else PaymentStatus(status)


@dataclasses.dataclass(frozen=True, slots=True)
class PaymentFilter:
    status: PaymentStatus | None = None
    customer_id: str | None = None
    created_from: dt.datetime | None = None
    created_to: dt.datetime | None = None
    # Keyset position: only payments strictly older than (created_at, id).
    before: tuple[dt.datetime, uuid.UUID] | None = None


async def list_payments(db: Database, where: PaymentFilter, limit: int) -> list[Record]:
    """Payments matching `where`, newest first (created_at, id), at most `limit`."""
    equal = {
        "status": None if where.status is None else where.status.value,
        "customer_id": where.customer_id,
    }
    sql, args = _newest_first_page(
        f"SELECT {PAYMENT_COLUMNS} FROM payments.payments",  # noqa: S608 - constant columns
        equal,
        where,
        limit,
    )
    return await db.fetch(sql, *args)


def _newest_first_page(
    select: str,
    equal: dict[str, Any],
    where: PaymentFilter | EventFilter,
    limit: int,
) -> tuple[str, list[Any]]:
    """`select` narrowed to the rows whose columns equal the given (non-None) values, created
    in [created_from, created_to), before the cursor's (created_at, id); newest first."""
    conditions: list[str] = []
    args: list[Any] = []

    def condition(template: str, value: Any) -> None:
        args.append(value)
        conditions.append(template.format(f"${len(args)}"))

    for column, value in equal.items():
        if value is not None:
            condition(column + " = {}", value)
    if where.created_from is not None:
        condition("created_at >= {}", where.created_from)
    if where.created_to is not None:
        condition("created_at < {}", where.created_to)
    if where.before is not None:
        args.extend(where.before)
        conditions.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    sql = (
        select  # built from fixed fragments; every value is bound
        + (" WHERE " + " AND ".join(conditions) if conditions else "")
        + f" ORDER BY created_at DESC, id DESC LIMIT ${len(args)}"
    )
    return sql, args


async def counts_by_status_and_currency(conn: Connection) -> list[Record]:
    """(status, currency, count, amount_minor) from the counter table the triggers keep."""
    return await conn.fetch(
        "SELECT status, currency, sum(count)::bigint AS count,"
        " sum(amount_minor)::bigint AS amount_minor"
        " FROM payments.payment_stats GROUP BY status, currency"
    )


# --- what the webhooks service checks an event against ---------------------------------------


async def charge_identities(
    conn: Connection, payment_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Record]:
    """(id, reference, provider, provider_reference) of each payment that exists, by id."""
    rows = await conn.fetch(
        "SELECT id, reference, provider, provider_reference FROM payments.payments"
        " WHERE id = ANY($1::uuid[])",
        list(payment_ids),
    )
    return {row["id"]: row for row in rows}


async def charge_holder(
    conn: Connection, provider: str | None, provider_reference: str, *, other_than: uuid.UUID
) -> uuid.UUID | None:
    """The payment, other than `other_than`, that already holds this provider charge."""
    holder: uuid.UUID | None = await conn.fetchval(
        "SELECT id FROM payments.payments"
        " WHERE provider IS NOT DISTINCT FROM $1 AND provider_reference = $2 AND id <> $3",
        provider,
        provider_reference,
        other_than,
    )
    return holder


# --- what the reconciler walks ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Unsettled:
    id: uuid.UUID
    reference: str
    status: PaymentStatus
    amount_minor: int
    currency: str
    customer_id: str
    created_at: dt.datetime
    age_seconds: float


async def unsettled_batch(
    db: Database,
    *,
    created_before: dt.datetime,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[Unsettled]:
    """Payments still pending or processing, created before `created_before`, oldest
    first, keyset-paged after (created_at, id)."""
    rows = await db.fetch(
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
        created_before,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [
        Unsettled(
            id=row["id"],
            reference=row["reference"],
            status=PaymentStatus(row["status"]),
            amount_minor=row["amount_minor"],
            currency=row["currency"],
            customer_id=row["customer_id"],
            created_at=row["created_at"],
            age_seconds=float(row["age_seconds"]),
        )
        for row in rows
    ]


async def oldest_unsettled_ages(db: Database) -> dict[PaymentStatus, float]:
    """Seconds since the oldest payment still pending, and still processing, was created
    (absent when there is none)."""
    rows = await db.fetch(
        """
        SELECT status, extract(epoch FROM now() - min(created_at)) AS age
          FROM payments.payments
         WHERE status IN ('pending', 'processing')
         GROUP BY status
        """
    )
    return {PaymentStatus(row["status"]): float(row["age"]) for row in rows}


# --- the event log (the gateway's GET /api/events) -------------------------------------------

EVENT_COLUMNS = "id, event_id, payment_id, type, payload, correlation_id, created_at, published_at"


@dataclasses.dataclass(frozen=True, slots=True)
class EventFilter:
    type: str | None = None
    payment_id: uuid.UUID | None = None
    created_from: dt.datetime | None = None
    created_to: dt.datetime | None = None
    # Keyset position: only events strictly older than (created_at, id).
    before: tuple[dt.datetime, int] | None = None


async def list_events(db: Database, where: EventFilter, limit: int) -> list[Record]:
    """Outbox events matching `where`, newest first (created_at, id), at most `limit`."""
    equal = {"type": where.type, "payment_id": where.payment_id}
    sql, args = _newest_first_page(
        f"SELECT {EVENT_COLUMNS} FROM payments.outbox",  # noqa: S608 - constant columns
        equal,
        where,
        limit,
    )
    return await db.fetch(sql, *args)


async def event_by_id(db: Database, event_id: uuid.UUID) -> Record | None:
    """One outbox event by its message_id; None when there is none (or it was pruned)."""
    return await db.fetchrow(
        f"SELECT {EVENT_COLUMNS} FROM payments.outbox WHERE event_id = $1",  # noqa: S608 - constant columns
        event_id,
    )
