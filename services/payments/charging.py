"""What the payments service does with `payment.requested` messages, a batch at a time.

1. One statement for the whole batch: claim the messages in the inbox, insert the new
   payments as `pending` with their creation audit rows, and read the status of those
   stored before.
2. Ask the provider to charge every payment still `pending`, concurrently, each with
   its payment id as the provider's idempotency key.
3. One statement: record the provider's answers through the state machine (`processing`
   with the charge id, or `failed` with the decline reason).

The consumer acks the batch's messages only after step 3. A crash anywhere redelivers
them: step 1 then finds the payments already stored; step 2 asks again and the provider
answers with the same charges; step 3 applies once. So the provider sees exactly one
charge per payment, however often a message comes. If the provider stays unreachable,
the payment stays `pending` and the reconciler submits it later.

Batching is what makes this fast: the database round trips and commits are paid once
per batch instead of once per payment. A single message is a batch of one, which is how
the consumer retries the messages of a batch that failed, one by one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from libs.common.db import Connection, Database
from libs.common.inbox import Inbox
from libs.common.logs import correlation_scope
from libs.common.messages import Envelope, PaymentRequested
from libs.common.metrics import PAYMENT_TRANSITIONS
from libs.common.provider_client import (
    PROVIDER_NAME,
    Charge,
    ProviderClient,
    ProviderRejected,
    ProviderUnavailable,
)
from libs.common.state_machine import TransitionRequest, apply_transitions
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

CREATION_REASON = "accepted by gateway"


@dataclass(frozen=True, slots=True)
class Stored:
    status: PaymentStatus
    # False when the payment was stored before: this message is a redelivery or a resend.
    inserted: bool


@dataclass(frozen=True, slots=True)
class PaymentIntake:
    db: Database
    provider: ProviderClient

    async def handle(self, envelope: Envelope[PaymentRequested]) -> None:
        await self.handle_batch([envelope])

    async def handle_batch(self, envelopes: Sequence[Envelope[PaymentRequested]]) -> None:
        # One payment's message twice in a batch (a resend racing a redelivery) is one payment.
        unique = list({e.payload.payment_id: e for e in reversed(envelopes)}.values())
        stored = await self.db.statement(lambda conn: store_payments(conn, unique))
        if log.isEnabledFor(logging.DEBUG):
            for envelope in unique:
                if stored[envelope.payload.payment_id].inserted:
                    # Logged once it committed: the statement above may run more than once.
                    with correlation_scope(envelope.correlation_id):
                        log.debug(
                            "payment stored",
                            extra={"payment_id": str(envelope.payload.payment_id)},
                        )
        # Charged before (a redelivery) or already settled by a webhook: nothing to ask.
        due = [e for e in unique if stored[e.payload.payment_id].status is PaymentStatus.PENDING]
        answers = await asyncio.gather(*(self._charge(envelope) for envelope in due))
        moves = [move for move in answers if move is not None]
        if moves:
            await self.db.statement(lambda conn: apply_transitions(conn, moves))
        # One line per payment: each log line costs as much CPU as a tenth of the work.
        for move in moves:
            with correlation_scope(move.correlation_id):
                log.info(
                    "charge recorded",
                    extra={
                        "payment_id": str(move.payment_id),
                        "charge_id": move.provider_reference,
                        "status": move.to_status.value,
                    },
                )

    async def _charge(self, envelope: Envelope[PaymentRequested]) -> TransitionRequest | None:
        """The move the provider's answer calls for; None when it could not be asked."""
        payment = envelope.payload
        with correlation_scope(envelope.correlation_id):
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
                return None
            except ProviderRejected as exc:
                CHARGE_REQUESTS.labels(outcome="rejected").inc()
                log.warning(
                    "provider refused the charge; payment failed",
                    extra={"payment_id": str(payment.payment_id), "error": str(exc)},
                )
                return TransitionRequest(
                    payment.payment_id,
                    PaymentStatus.FAILED,
                    TransitionSource.PROVIDER,
                    failure_reason=f"provider_rejected: {exc}",
                    correlation_id=envelope.correlation_id,
                )
            CHARGE_REQUESTS.labels(outcome=charge.status).inc()
            return charge_transition(payment.payment_id, charge, envelope.correlation_id)


_STORE_SQL = """
WITH incoming AS (
    SELECT *
      FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                  $7::text[], $8::jsonb[], $9::timestamptz[], $10::text[])
        AS i(message_id, id, reference, amount_minor, currency, customer_id, description,
             metadata, requested_at, correlation_id)
), claimed AS (
    -- Inbox.claim_all's insert, inlined so that the whole batch is one statement.
    INSERT INTO payments.inbox (consumer, message_id, message_type)
    SELECT $11, message_id, $12 FROM incoming
    ON CONFLICT DO NOTHING
), inserted AS (
    INSERT INTO payments.payments
        (id, reference, amount_minor, currency, customer_id, description, metadata,
         created_at, updated_at)
    SELECT id, reference, amount_minor, currency, customer_id, description, metadata,
           requested_at, requested_at
      FROM incoming
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), created AS (
    INSERT INTO payments.payment_events
        (payment_id, from_status, to_status, applied, source, reason, correlation_id)
    SELECT incoming.id, NULL, 'pending', true, $13, $14, incoming.correlation_id
      FROM incoming JOIN inserted USING (id)
)
SELECT incoming.id, inserted.id IS NOT NULL AS inserted,
       -- The statement's snapshot does not see its own inserts: those are pending.
       CASE WHEN inserted.id IS NOT NULL THEN 'pending' ELSE stored.status END AS status
  FROM incoming
  LEFT JOIN inserted USING (id)
  LEFT JOIN payments.payments AS stored ON stored.id = incoming.id
"""


async def store_payments(
    conn: Connection, envelopes: Sequence[Envelope[PaymentRequested]]
) -> dict[uuid.UUID, Stored]:
    """Insert the new payments (one statement); every payment's status, by payment id.

    At most one envelope per payment."""
    payments = [e.payload for e in envelopes]
    rows = await conn.fetch(
        _STORE_SQL,
        [e.message_id for e in envelopes],
        [p.payment_id for p in payments],
        [p.reference for p in payments],
        [p.amount_minor for p in payments],
        [p.currency for p in payments],
        [p.customer_id for p in payments],
        [p.description for p in payments],
        [p.metadata for p in payments],
        [p.requested_at for p in payments],
        [e.correlation_id for e in envelopes],
        INBOX.consumer,
        PaymentRequested.TYPE,
        TransitionSource.API.value,
        CREATION_REASON,
    )
    result = {row["id"]: Stored(PaymentStatus(row["status"]), row["inserted"]) for row in rows}
    created = sum(stored.inserted for stored in result.values())
    if created:
        PAYMENT_TRANSITIONS.labels(
            source=TransitionSource.API.value,
            to_status=PaymentStatus.PENDING.value,
            outcome="applied",
        ).inc(created)
    return result


def charge_transition(
    payment_id: uuid.UUID, charge: Charge, correlation_id: str | None = None
) -> TransitionRequest:
    """The move a charge's status calls for."""
    target = CHARGE_OUTCOME[charge.status]
    return TransitionRequest(
        payment_id,
        target,
        TransitionSource.PROVIDER,
        reason=f"charge {charge.id} {charge.status}",
        provider=PROVIDER_NAME,
        provider_reference=charge.id,
        failure_reason=charge.decline_reason if target is PaymentStatus.FAILED else None,
        correlation_id=correlation_id,
    )
