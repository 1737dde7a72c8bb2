"""What the payments service does with a `payment.requested` message.

1. One transaction: claim the message in the inbox, insert the payment as `pending`
   (if it is not there yet) with its creation audit row.
2. If the payment is still `pending`, ask the provider to charge it, with the payment id
   as the provider's idempotency key.
3. One transaction: record the provider's answer through the state machine
   (`processing` with the charge id, or `failed` with the decline reason).

A crash anywhere redelivers the message. Step 1 then finds the payment already stored;
step 2 asks again and the provider answers with the same charge; step 3 applies once.
So the provider sees exactly one charge per payment, however often the message comes.
If the provider stays unreachable, the payment stays `pending` and the reconciler
submits it later.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from libs.common.db import Connection, Database
from libs.common.inbox import Inbox
from libs.common.messages import Envelope, PaymentRequested
from libs.common.provider_client import (
    PROVIDER_NAME,
    Charge,
    ProviderClient,
    ProviderRejected,
    ProviderUnavailable,
)
from libs.common.state_machine import apply_transition, record_creation
from libs.common.states import PaymentStatus, TransitionSource
from services.payments.metrics import CHARGE_REQUESTS

log = logging.getLogger(__name__)

INBOX = Inbox("payments", "payments.payment-requested")

# What the provider's charge status means for the payment.
CHARGE_OUTCOME = {
    "processing": PaymentStatus.PROCESSING,
    "succeeded": PaymentStatus.COMPLETED,
    "declined": PaymentStatus.FAILED,
}


@dataclass(frozen=True, slots=True)
class PaymentIntake:
    db: Database
    provider: ProviderClient

    async def handle(self, envelope: Envelope[PaymentRequested]) -> None:
        payment = envelope.payload
        status, inserted = await self.db.transaction(lambda conn: _store(conn, envelope))
        if inserted:
            # Logged once it committed: the transaction above may run more than once.
            log.info("payment stored", extra={"payment_id": str(payment.payment_id)})
        if status is not PaymentStatus.PENDING:
            # Charged before (this is a redelivery) or already settled by a webhook.
            return
        try:
            charge = await self.provider.create_charge(
                payment_id=payment.payment_id,
                reference=payment.reference,
                amount_minor=payment.amount_minor,
                currency=payment.currency,
                customer_id=payment.customer_id,
            )
        except ProviderUnavailable as exc:
            CHARGE_REQUESTS.labels(outcome="unavailable").inc()
            log.warning(
                "provider unreachable; payment left pending for the reconciler",
                extra={"payment_id": str(payment.payment_id), "error": str(exc)},
            )
            return
        except ProviderRejected as exc:
            CHARGE_REQUESTS.labels(outcome="rejected").inc()
            reason = f"provider_rejected: {exc}"
            await self.db.transaction(
                lambda conn: apply_transition(
                    conn,
                    payment.payment_id,
                    PaymentStatus.FAILED,
                    source=TransitionSource.PROVIDER,
                    failure_reason=reason,
                )
            )
            return
        CHARGE_REQUESTS.labels(outcome=charge.status).inc()
        await self.db.transaction(lambda conn: record_charge(conn, payment.payment_id, charge))
        log.info(
            "charge recorded",
            extra={
                "payment_id": str(payment.payment_id),
                "charge_id": charge.id,
                "charge_status": charge.status,
            },
        )


async def _store(
    conn: Connection, envelope: Envelope[PaymentRequested]
) -> tuple[PaymentStatus, bool]:
    """Insert the payment if new; return its current status and whether it was new."""
    payment = envelope.payload
    await INBOX.claim(conn, envelope)
    inserted = await conn.fetchval(
        """
        INSERT INTO payments.payments
            (id, reference, amount_minor, currency, customer_id, description, metadata,
             created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
        ON CONFLICT (id) DO NOTHING
        RETURNING true
        """,
        payment.payment_id,
        payment.reference,
        payment.amount_minor,
        payment.currency,
        payment.customer_id,
        payment.description,
        payment.metadata,
        payment.requested_at,
    )
    if inserted:
        await record_creation(
            conn, payment.payment_id, source=TransitionSource.API, reason="accepted by gateway"
        )
        return PaymentStatus.PENDING, True
    status = await conn.fetchval(
        "SELECT status FROM payments.payments WHERE id = $1", payment.payment_id
    )
    return PaymentStatus(status), False


async def record_charge(conn: Connection, payment_id: uuid.UUID, charge: Charge) -> None:
    target = CHARGE_OUTCOME[charge.status]
    await apply_transition(
        conn,
        payment_id,
        target,
        source=TransitionSource.PROVIDER,
        reason=f"charge {charge.id} {charge.status}",
        provider=PROVIDER_NAME,
        provider_reference=charge.id,
        failure_reason=charge.decline_reason if target is PaymentStatus.FAILED else None,
    )
