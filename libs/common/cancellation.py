"""Canceling a payment, and the claim that makes a cancel and a charge exclude each other.

A payment may be canceled while it is `pending` and nobody has started charging it.
"Started charging" is a fact stored on the payment's row, `charge_requested_at`, set by
`claim_for_charging` in a transaction that commits *before* the provider is asked;
`cancel_payment` reads it under the same row lock. Both are conditional on the row as it
is once the lock is granted (an UPDATE re-checks its WHERE on the newest row version;
the cancel's FOR UPDATE reads it), so whichever commits first wins and the other sees it:

- the cancel first: the payment is `canceled`; the claim's `status = 'pending'` no longer
  holds, the payment is not claimed, and the provider is never asked (however often, or
  however late, its payment.requested is delivered, and whatever the reconciler finds);
- the claim first: the cancel finds `charge_requested_at` set and answers 409; the
  payment goes on to `processing` (or further) as the provider answers.

The claim is never released: once the provider may have been asked (a timeout, a 5xx),
only its answer can say whether it charged, so the cancel stays refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from asyncpg import Record

from libs.common.db import Connection, Database
from libs.common.errors import ApiError
from libs.common.refunds import lock_owned_payment
from libs.common.state_machine import TransitionRequest, apply_transitions
from libs.common.states import PaymentStatus, TransitionSource

_CLAIM_SQL = """
UPDATE payments.payments
   SET charge_requested_at = coalesce(charge_requested_at, now())
 WHERE id = ANY($1::uuid[]) AND status = 'pending'
RETURNING id
"""


async def claim_for_charging(conn: Connection, payment_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Claim the payments still `pending` for charging (one statement); the ids claimed,
    now or before. Commit it before asking the provider; the others must not be charged."""
    if not payment_ids:
        return set()
    # Locked in id order, as the state machine does, so two claims cannot deadlock.
    rows = await conn.fetch(_CLAIM_SQL, sorted(payment_ids))
    return {row["id"] for row in rows}


async def cancel_payment(db: Database, payment_id: uuid.UUID, owner: str) -> PaymentStatus:
    """Cancel `owner`'s pending payment that nobody started charging; ApiError otherwise."""

    async def cancel(conn: Connection) -> PaymentStatus:
        payment: Record = await lock_owned_payment(conn, payment_id, owner)
        status = PaymentStatus(payment["status"])
        if status is PaymentStatus.CANCELED:
            # Asked again (a retry after a lost answer): the same outcome, nothing new.
            return status
        if status is not PaymentStatus.PENDING or payment["charge_requested_at"] is not None:
            why = (
                "charging it began; its outcome will show in its status"
                if status is PaymentStatus.PENDING
                else f"it is {status}"
            )
            raise ApiError(
                409,
                "payment_not_cancelable",
                f"Payment {payment_id} cannot be canceled: {why}. Only a pending payment the"
                " provider has not been asked to charge can be.",
                details=[{"field": "status", "code": status.value, "message": "payment status"}],
            )
        (transition,) = await apply_transitions(
            conn,
            [
                TransitionRequest(
                    payment_id,
                    PaymentStatus.CANCELED,
                    TransitionSource.API,
                    reason="canceled by the client before it was charged",
                )
            ],
        )
        if not transition.applied:
            raise RuntimeError(f"cancel of {payment_id} refused under its own lock")
        return PaymentStatus.CANCELED

    return await db.transaction(cancel)
