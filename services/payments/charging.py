"""What the payments service does with `payment.requested` messages, a batch at a time.

1. One transaction for the whole batch: claim the messages in the inbox, then one
   statement inserts the new payments as `pending` with their creation audit rows and
   reads the status of those stored before.
   A second statement claims the pending ones for charging (libs.common.cancellation):
   a payment canceled meanwhile is not charged.
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

from libs.common.cancellation import claim_for_charging
from libs.common.db import Connection, Database
from libs.common.logs import correlation_scope
from libs.common.messages import Envelope, PaymentRequested
from libs.common.payments_store import INBOX, charge_transition
from libs.common.provider_client import ProviderClient, ProviderRejected, ProviderUnavailable
from libs.common.state_machine import (
    NewPayment,
    Stored,
    TransitionRequest,
    apply_transitions,
    create_payments,
)
from libs.common.states import PaymentStatus, TransitionSource
from services.payments.metrics import CHARGE_REQUESTS

log = logging.getLogger(__name__)

CREATION_REASON = "accepted by gateway"


@dataclass(frozen=True, slots=True)
class PaymentIntake:
    db: Database
    provider: ProviderClient

    async def handle(self, envelope: Envelope[PaymentRequested]) -> None:
        await self.handle_batch([envelope])

    async def handle_batch(self, envelopes: Sequence[Envelope[PaymentRequested]]) -> None:
        # One payment's message twice in a batch (a resend racing a redelivery) is one payment.
        unique = list({e.payload.payment_id: e for e in reversed(envelopes)}.values())
        stored = await self.db.transaction(lambda conn: store_payments(conn, unique))
        if log.isEnabledFor(logging.DEBUG):
            for envelope in unique:
                if stored[envelope.payload.payment_id].inserted:
                    # Logged once it committed: the transaction above may run more than once.
                    with correlation_scope(envelope.correlation_id):
                        log.debug(
                            "payment stored",
                            extra={"payment_id": str(envelope.payload.payment_id)},
                        )
        # Charged before (a redelivery) or already settled by a webhook: nothing to ask.
        pending = [
            e.payload.payment_id
            for e in unique
            if stored[e.payload.payment_id].status is PaymentStatus.PENDING
        ]
        # The claim commits before the provider is asked: a cancel that got in first is
        # not claimed (and never charged), one that comes after is refused.
        claimed = (
            await self.db.statement(lambda conn: claim_for_charging(conn, pending))
            if pending
            else set()
        )
        due = [e for e in unique if e.payload.payment_id in claimed]
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
            return charge_transition(
                payment.payment_id,
                charge,
                source=TransitionSource.PROVIDER,
                reason=f"charge {charge.id} {charge.status}",
                correlation_id=envelope.correlation_id,
            )


async def store_payments(
    conn: Connection, envelopes: Sequence[Envelope[PaymentRequested]]
) -> dict[uuid.UUID, Stored]:
    """Claim the messages and insert the new payments; every payment's status, by id.

    At most one envelope per payment; inside the caller's transaction."""
    await INBOX.claim_all(conn, envelopes)
    return await create_payments(
        conn,
        [
            NewPayment(
                id=p.payment_id,
                reference=p.reference,
                amount_minor=p.amount_minor,
                currency=p.currency,
                customer_id=p.customer_id,
                description=p.description,
                metadata=p.metadata,
                created_at=p.requested_at,
                correlation_id=e.correlation_id,
                owner=p.owner,
            )
            for e in envelopes
            for p in (e.payload,)
        ],
        source=TransitionSource.API,
        reason=CREATION_REASON,
    )
