"""Refunds: every statement on payments.refunds, and how a settled refund moves its payment.

The payments schema owns refunds; every service reaches them only through this module.

- The gateway creates a refund (`create_refund`): one transaction that locks the payment's
  row, then adds up its refunds not failed and inserts the new one only if it fits in
  what the payment captured. Two refunds of one payment take turns on that lock, and the
  second one's sum (a statement of its own, so a snapshot taken after the lock was
  granted) includes the first: the refunds of a payment never add up to more than it.
- The payments service claims a pending refund for submission (`claim_submission`),
  asks the provider under the refund's id, and records the provider's refund id.
- The webhooks service and the reconciler settle it (`settle_refund`): the refund moves
  pending → succeeded | failed only once (a conditional UPDATE, so a duplicate webhook
  or a late reconciler verdict changes nothing), and a success moves the payment through
  the one state machine: `refunded` once its succeeded refunds add up to its amount,
  `partially_refunded` before.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

from asyncpg import Record

from libs.common.db import Connection, Database
from libs.common.errors import ApiError
from libs.common.logs import get_correlation_id
from libs.common.metrics import REFUNDS_SETTLED
from libs.common.money import MoneyError, format_minor_units, to_minor_units
from libs.common.state_machine import Transition, TransitionRequest, apply_transitions
from libs.common.states import REFUNDABLE, PaymentStatus, RefundStatus, TransitionSource

_COLUMNS = """
    id, payment_id, amount_minor, currency, reason, status, failure_reason,
    provider_refund_id, submitted_at, settled_at, created_at, updated_at
"""


def refund_json(row: Record) -> dict[str, Any]:
    """A refund as the API shows it."""
    return {
        "id": str(row["id"]),
        "payment_id": str(row["payment_id"]),
        "amount": format_minor_units(row["amount_minor"], row["currency"]),
        "currency": row["currency"],
        "reason": row["reason"],
        "status": row["status"],
        "failure_reason": row["failure_reason"],
        "provider_refund_id": row["provider_refund_id"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
        "settled_at": None if row["settled_at"] is None else row["settled_at"].isoformat(),
    }


def payment_not_found(payment_id: uuid.UUID) -> ApiError:
    return ApiError(
        404,
        "payment_not_found",
        f"No payment {payment_id}. One accepted a moment ago may take a second to appear.",
    )


_LOCK_PAYMENT_SQL = """
SELECT id, status, amount_minor, currency, owner, charge_requested_at
  FROM payments.payments WHERE id = $1 FOR UPDATE
"""


async def lock_owned_payment(conn: Connection, payment_id: uuid.UUID, owner: str) -> Record:
    """The payment's row, locked until the transaction ends; 404 for another key's payment
    (as for one that does not exist: a key learns nothing about others' payments)."""
    row = await conn.fetchrow(_LOCK_PAYMENT_SQL, payment_id)
    if row is None or (row["owner"] is not None and row["owner"] != owner):
        raise payment_not_found(payment_id)
    return row


@dataclasses.dataclass(frozen=True, slots=True)
class NewRefund:
    refund_id: uuid.UUID
    payment_id: uuid.UUID
    owner: str
    # None: what is left to refund.
    amount: Decimal | None
    reason: str | None
    # When the client named one: it must be the payment's.
    currency: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    refund: Record
    # False when the refund existed already (a retry under the same Idempotency-Key).
    inserted: bool


_RESERVED_SQL = """
SELECT coalesce(sum(amount_minor), 0)::bigint FROM payments.refunds
 WHERE payment_id = $1 AND status <> 'failed'
"""

_INSERT_SQL = f"""
INSERT INTO payments.refunds (id, payment_id, amount_minor, currency, reason, correlation_id)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING {_COLUMNS}
"""  # noqa: S608 - the column list is a constant, every value a parameter

_BY_ID_SQL = f"SELECT {_COLUMNS} FROM payments.refunds WHERE id = $1"  # noqa: S608 - same


async def create_refund(db: Database, new: NewRefund) -> Created:
    """Store `new` as pending if its payment can give it back; ApiError (4xx) otherwise,
    with nothing stored."""

    async def create(conn: Connection) -> Created:
        payment = await lock_owned_payment(conn, new.payment_id, new.owner)
        existing = await conn.fetchrow(_BY_ID_SQL, new.refund_id)
        if existing is not None:
            return Created(existing, inserted=False)
        status = payment["status"]
        if status not in REFUNDABLE:
            raise ApiError(
                409,
                "payment_not_refundable",
                f"Payment {new.payment_id} is {status}; only a completed or partially"
                " refunded payment can be refunded.",
                details=[{"field": "status", "code": status, "message": "payment status"}],
            )
        currency = payment["currency"]
        if new.currency is not None and new.currency != currency:
            raise ApiError(
                422,
                "currency_mismatch",
                f"Payment {new.payment_id} is in {currency}; a refund is in the payment's"
                f" currency, not {new.currency}.",
            )
        reserved: int = await conn.fetchval(_RESERVED_SQL, new.payment_id)
        left = payment["amount_minor"] - reserved
        if new.amount is None:
            amount_minor = left
        else:
            try:
                amount_minor = to_minor_units(new.amount, currency)
            except MoneyError as exc:
                raise ApiError(422, exc.code, exc.message) from None
        if left <= 0:
            raise ApiError(
                409,
                "nothing_to_refund",
                f"Payment {new.payment_id} has nothing left to refund (its refunds, pending or"
                " succeeded, add up to its amount).",
            )
        if amount_minor > left:
            raise ApiError(
                422,
                "amount_exceeds_refundable",
                f"Payment {new.payment_id} has {format_minor_units(left, currency)} {currency}"
                " left to refund.",
            )
        row = await conn.fetchrow(
            _INSERT_SQL,
            new.refund_id,
            new.payment_id,
            amount_minor,
            currency,
            new.reason,
            get_correlation_id(),
        )
        if row is None:
            raise RuntimeError(f"refund {new.refund_id} was not inserted")
        return Created(row, inserted=True)

    return await db.transaction(create)


async def withdraw(db: Database, refund_id: uuid.UUID) -> bool:
    """Remove a refund the broker never confirmed, unless it was submitted meanwhile (then
    it goes on); whether it was removed."""
    status = await db.transaction(
        lambda conn: conn.execute(
            "DELETE FROM payments.refunds"
            " WHERE id = $1 AND status = 'pending' AND submitted_at IS NULL",
            refund_id,
        )
    )
    return bool(status.endswith(" 1"))


async def get_refund(db: Database, refund_id: uuid.UUID, owner: str) -> Record:
    """One refund of one of `owner`'s payments; 404 otherwise."""
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM payments.refunds r"  # noqa: S608 - constant columns
        " WHERE id = $1 AND EXISTS (SELECT 1 FROM payments.payments p"
        " WHERE p.id = r.payment_id AND (p.owner IS NULL OR p.owner = $2))",
        refund_id,
        owner,
    )
    if row is None:
        raise ApiError(404, "refund_not_found", f"No refund {refund_id}.")
    return row


async def list_refunds(db: Database, payment_id: uuid.UUID, owner: str) -> list[Record]:
    """A payment's refunds, oldest first; 404 for a payment `owner` may not see."""

    async def read(conn: Connection) -> list[Record]:
        payment = await conn.fetchrow(
            "SELECT owner FROM payments.payments WHERE id = $1", payment_id
        )
        if payment is None or (payment["owner"] is not None and payment["owner"] != owner):
            raise payment_not_found(payment_id)
        return await conn.fetch(
            f"SELECT {_COLUMNS} FROM payments.refunds"  # noqa: S608 - constant columns
            " WHERE payment_id = $1 ORDER BY created_at, id",
            payment_id,
        )

    return await db.transaction(read)


# --- submitting to the provider (the payments service, the reconciler) ------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ToSubmit:
    refund_id: uuid.UUID
    payment_id: uuid.UUID
    charge_id: str | None
    amount_minor: int
    currency: str
    correlation_id: str | None


_CLAIM_SQL = """
UPDATE payments.refunds AS r
   SET submitted_at = coalesce(r.submitted_at, now())
  FROM payments.payments AS p
 WHERE r.id = $1 AND r.status = 'pending' AND p.id = r.payment_id
RETURNING r.id, r.payment_id, p.provider_reference AS charge_id, r.amount_minor, r.currency,
          r.correlation_id
"""


async def claim_submission(conn: Connection, refund_id: uuid.UUID) -> ToSubmit | None:
    """Mark a pending refund as (being) submitted; None if it is not pending (settled, or
    withdrawn by the gateway). From here on the gateway cannot withdraw it."""
    row = await conn.fetchrow(_CLAIM_SQL, refund_id)
    if row is None:
        return None
    return ToSubmit(
        row["id"],
        row["payment_id"],
        row["charge_id"],
        row["amount_minor"],
        row["currency"],
        row["correlation_id"],
    )


async def record_provider_refund(
    conn: Connection, refund_id: uuid.UUID, provider_refund_id: str
) -> None:
    await conn.execute(
        "UPDATE payments.refunds SET provider_refund_id = $2"
        " WHERE id = $1 AND provider_refund_id IS NULL",
        refund_id,
        provider_refund_id,
    )


# --- settling (the webhooks service, the reconciler, a refusal by the provider) ---------------


@dataclasses.dataclass(frozen=True, slots=True)
class Settled:
    # None when there is no such refund.
    found: bool
    # False when the refund had settled before: nothing changed.
    applied: bool
    payment_id: uuid.UUID | None = None
    # The payment's move, for a refund that succeeded.
    transition: Transition | None = None


_LOCK_FOR_SETTLEMENT_SQL = """
SELECT p.id, p.amount_minor, p.currency
  FROM payments.refunds r JOIN payments.payments p ON p.id = r.payment_id
 WHERE r.id = $1 AND ($2::uuid IS NULL OR r.payment_id = $2)
   FOR UPDATE OF p
"""

_SETTLE_SQL = """
UPDATE payments.refunds
   SET status = $2, failure_reason = $3, provider_refund_id = coalesce(provider_refund_id, $4),
       settled_at = now()
 WHERE id = $1 AND status = 'pending'
RETURNING amount_minor
"""

_SUCCEEDED_SQL = """
SELECT coalesce(sum(amount_minor), 0)::bigint FROM payments.refunds
 WHERE payment_id = $1 AND status = 'succeeded'
"""


async def settle_refund(
    conn: Connection,
    refund_id: uuid.UUID,
    *,
    succeeded: bool,
    source: TransitionSource,
    reason: str,
    failure_reason: str | None = None,
    provider_refund_id: str | None = None,
    of_payment: uuid.UUID | None = None,
) -> Settled:
    """Give a pending refund its outcome and move its payment if it succeeded; inside the
    caller's transaction (with its inbox entry or webhook event). With `of_payment`, a
    refund of another payment is as good as unknown."""
    payment = await conn.fetchrow(_LOCK_FOR_SETTLEMENT_SQL, refund_id, of_payment)
    if payment is None:
        return Settled(found=False, applied=False)
    status = RefundStatus.SUCCEEDED if succeeded else RefundStatus.FAILED
    moved = await conn.fetchrow(
        _SETTLE_SQL,
        refund_id,
        status.value,
        None if succeeded else (failure_reason or "failed at the provider"),
        provider_refund_id,
    )
    if moved is None:
        return Settled(found=True, applied=False, payment_id=payment["id"])
    REFUNDS_SETTLED.labels(source=source.value, status=status.value).inc()
    if not succeeded:
        return Settled(found=True, applied=True, payment_id=payment["id"])
    refunded: int = await conn.fetchval(_SUCCEEDED_SQL, payment["id"])
    target = (
        PaymentStatus.REFUNDED
        if refunded >= payment["amount_minor"]
        else PaymentStatus.PARTIALLY_REFUNDED
    )
    amount = format_minor_units(moved["amount_minor"], payment["currency"])
    total = format_minor_units(refunded, payment["currency"])
    (transition,) = await apply_transitions(
        conn,
        [
            TransitionRequest(
                payment["id"],
                target,
                source,
                reason=f"refund {refund_id} of {amount} succeeded ({total} refunded in all);"
                f" {reason}",
            )
        ],
    )
    return Settled(found=True, applied=True, payment_id=payment["id"], transition=transition)


# --- what the reconciler walks, and the stats ---------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Unsettled:
    refund_id: uuid.UUID
    submitted: bool
    age_seconds: float


async def unsettled(
    db: Database,
    *,
    older_than: dt.datetime,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> tuple[list[Unsettled], tuple[dt.datetime, uuid.UUID] | None]:
    """Refunds still pending since before `older_than`, oldest first, a page at a time."""
    rows = await db.fetch(
        """
        SELECT id, created_at, submitted_at IS NOT NULL AS submitted,
               extract(epoch FROM now() - created_at) AS age_seconds
          FROM payments.refunds
         WHERE status = 'pending' AND created_at < $1
           AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))
         ORDER BY created_at, id
         LIMIT $4
        """,
        older_than,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    page = [Unsettled(r["id"], r["submitted"], float(r["age_seconds"])) for r in rows]
    return page, ((rows[-1]["created_at"], rows[-1]["id"]) if rows else after)


async def refunded_by_currency(conn: Connection) -> list[Record]:
    """Succeeded refunds' count and sum per currency (and the pending ones', apart)."""
    return await conn.fetch(
        "SELECT currency, status, count(*) AS count, sum(amount_minor)::bigint AS amount_minor"
        " FROM payments.refunds WHERE status IN ('succeeded', 'pending')"
        " GROUP BY currency, status"
    )


async def oldest_pending_age(db: Database) -> float:
    """Seconds since the oldest refund still pending was asked for (0 when none is)."""
    row = await db.fetchrow(
        "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age"
        " FROM payments.refunds WHERE status = 'pending'"
    )
    return 0.0 if row is None else float(row["age"])
