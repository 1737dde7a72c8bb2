"""What the webhooks service does with a verified provider callback.

One transaction per batch of messages (a batch of one when the consumer retries them
one by one): claim the messages in the inbox, store each event once (keyed by provider
and provider event id; a repeat only bumps its duplicate count), and apply the new ones
to their payments through the shared state machine, all payments of the batch in one
statement. So a redelivered message or a resent webhook never applies twice, and an
event is never applied without being stored. A few statements per batch, whatever its
size: that is what lets one process keep up with the provider's webhooks.

What can become of an event:
- applied: the payment moved;
- refused: the move was not allowed (a late or out-of-order event: failed after
  completed, processing after completed); recorded in the payment's audit trail;
- rejected: it names no valid payment id, or a payment whose reference (or charge)
  differs from the event's;
- ignored: an event type this platform does not act on;
- a refund event (refund.succeeded / refund.failed) settles the refund its
  data.refund_id names, which moves the payment if it succeeded; applied once, refused
  when the refund had settled before (a duplicate, or the reconciler was first);
- orphaned: no such payment yet (the webhook beat the payment). Tried again with a
  growing delay; if the payment never appears it stays orphaned, counted and visible.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence

import asyncpg
from asyncpg import Record

from libs.common.broker.consumer import PoisonMessage
from libs.common.db import Connection, Database
from libs.common.logs import correlation_scope
from libs.common.messages import Envelope, WebhookReceived
from libs.common.payments_store import charge_holder, charge_identities
from libs.common.refunds import settle_refund
from libs.common.state_machine import Transition, TransitionRequest, apply_transitions
from libs.common.states import PaymentStatus, TransitionSource
from libs.common.webhook_events import InvalidEvent, ProviderEvent, parse_event
from libs.common.webhooks_store import (
    INBOX,
    NewEvent,
    Outcome,
    count_duplicates,
    lock_due_orphans,
    record_outcomes,
    record_retry_failure,
    store_events,
)
from services.webhooks.metrics import WEBHOOK_EVENTS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookIntake:
    db: Database

    async def handle(self, envelope: Envelope[WebhookReceived]) -> None:
        await self.handle_batch([envelope])

    async def handle_batch(self, envelopes: Sequence[Envelope[WebhookReceived]]) -> None:
        received = []
        for envelope in envelopes:
            try:
                received.append((envelope, parse_event(envelope.payload.raw_body)))
            except InvalidEvent as exc:
                # The gateway checked the same; a body that fails here cannot succeed later.
                raise PoisonMessage(f"unreadable webhook body: {exc.message}") from exc
        outcomes = await self.db.transaction(lambda conn: record_and_apply(conn, received))
        for (envelope, event), outcome in zip(received, outcomes, strict=True):
            WEBHOOK_EVENTS.labels(outcome=outcome).inc()
            with correlation_scope(envelope.correlation_id):
                log.info(
                    "webhook event handled",
                    extra={
                        "event_id": str(event.id),
                        "event_type": event.event_type,
                        "outcome": outcome,
                    },
                )


async def record_and_apply(
    conn: Connection, received: Sequence[tuple[Envelope[WebhookReceived], ProviderEvent]]
) -> list[str]:
    """Store each message's event once and apply the new ones; each message's outcome.

    A few statements for the whole batch, inside the caller's transaction."""
    claimed = await INBOX.claim_all(conn, [envelope for envelope, _ in received])
    # The first message carrying an event stores it; any other is a duplicate of it.
    first: dict[uuid.UUID, tuple[Envelope[WebhookReceived], ProviderEvent]] = {}
    for envelope, event in received:
        if envelope.message_id in claimed:
            first.setdefault(event.id, (envelope, event))
    new = list(first.values())
    stored = await store_events(
        conn,
        [
            NewEvent(
                id=event.id,
                provider=event.provider,
                provider_event_id=event.provider_event_id,
                event_type=event.event_type,
                claimed_payment_id=event.claimed_payment_id,
                raw_body=envelope.payload.raw_body,
                headers=envelope.payload.headers,
                signature_scheme=envelope.payload.signature_scheme,
                received_at=envelope.payload.received_at,
                verified_at=envelope.payload.verified_at,
            )
            for envelope, event in new
        ],
    )
    to_apply = [(envelope, event) for envelope, event in new if event.id in stored]
    applied = dict(
        zip(
            [event.id for _, event in to_apply],
            await apply_events(
                conn,
                [event for _, event in to_apply],
                # Each audit row under the correlation id of the request that caused it.
                correlation_ids=[envelope.correlation_id for envelope, _ in to_apply],
            ),
            strict=True,
        )
    )
    outcomes: list[str] = []
    duplicates: dict[uuid.UUID, int] = {}
    seen: set[uuid.UUID] = set()
    for envelope, event in received:
        if envelope.message_id not in claimed or envelope.message_id in seen:
            outcomes.append("redelivered")
            seen.add(envelope.message_id)
            continue
        seen.add(envelope.message_id)
        if first[event.id][0] is envelope and event.id in applied:
            outcomes.append(applied[event.id])
        else:
            duplicates[event.id] = duplicates.get(event.id, 0) + 1
            outcomes.append("duplicate")
    await count_duplicates(conn, duplicates)
    return outcomes


@dataclasses.dataclass(frozen=True, slots=True)
class _Decision:
    status: str
    error: str | None = None
    payment_id: uuid.UUID | None = None
    # The move to make, when the event is to be applied.
    move: TransitionRequest | None = None
    # A refund event to settle, once its payment checked out.
    refund: bool = False


async def apply_event(conn: Connection, event: ProviderEvent) -> str:
    """Apply a stored event to its payment and record the outcome on the event."""
    (outcome,) = await apply_events(conn, [event])
    return outcome


async def apply_events(
    conn: Connection,
    events: Sequence[ProviderEvent],
    *,
    correlation_ids: Sequence[str | None] | None = None,
) -> list[str]:
    """Apply stored events to their payments and record each outcome on its event.

    The audit rows take `correlation_ids` (one per event), or the current context's."""
    if not events:
        return []
    ids = [event.payment_id for event in events if event.payment_id is not None]
    payments = await charge_identities(conn, ids)
    decisions = [
        await _decide(conn, event, payments, correlation_id)
        for event, correlation_id in zip(
            events, correlation_ids or [None] * len(events), strict=True
        )
    ]
    for i, decision in enumerate(decisions):
        if decision.refund:
            with correlation_scope(correlation_ids[i] if correlation_ids else None):
                decisions[i] = await _settle_refund(conn, events[i], decision)
    # One move per payment per statement: a payment's second event waits for the next round.
    pending = [i for i, d in enumerate(decisions) if d.move is not None]
    while pending:
        this_round: dict[uuid.UUID, int] = {}
        later: list[int] = []
        for i in pending:
            move = decisions[i].move
            if move is not None and move.payment_id not in this_round:
                this_round[move.payment_id] = i
            else:
                later.append(i)
        moves = [decisions[i].move for i in this_round.values()]
        results = await apply_transitions(conn, [m for m in moves if m is not None])
        for i, transition in zip(this_round.values(), results, strict=True):
            decisions[i] = _outcome(events[i], transition)
        pending = later
    await record_outcomes(
        conn,
        [
            Outcome(event.id, d.status, d.error, d.payment_id)
            for event, d in zip(events, decisions, strict=True)
        ],
    )
    return [d.status for d in decisions]


async def _settle_refund(conn: Connection, event: ProviderEvent, decision: _Decision) -> _Decision:
    """Settle the refund a refund event names (which moves its payment if it succeeded)."""
    refund_id = event.refund_id
    if refund_id is None or event.refund_outcome is None:
        raise ValueError("not a refund event")
    settled = await settle_refund(
        conn,
        refund_id,
        succeeded=event.refund_outcome,
        source=TransitionSource.WEBHOOK,
        reason=f"webhook {event.provider}:{event.provider_event_id}",
        failure_reason=event.failure_reason,
        provider_refund_id=event.provider_refund_id,
        of_payment=decision.payment_id,
    )
    if not settled.found:
        return _Decision(
            "rejected",
            f"no refund {refund_id} of payment {decision.payment_id}",
            decision.payment_id,
        )
    if not settled.applied:
        return _Decision("refused", f"refund {refund_id} had settled before", decision.payment_id)
    if settled.transition is not None and not settled.transition.applied:
        # The refund is recorded; the payment's move was refused (recorded in its audit).
        return _Decision(
            "refused",
            f"refund {refund_id} recorded; payment not allowed from"
            f" {settled.transition.from_status} to {settled.transition.to_status}",
            decision.payment_id,
        )
    return _Decision("applied", None, decision.payment_id)


def _outcome(event: ProviderEvent, transition: Transition) -> _Decision:
    if not transition.found:
        # Deleted since we looked: as if it never came.
        return _Decision("orphaned", f"no payment {transition.payment_id} (yet)")
    if transition.applied:
        return _Decision("applied", None, transition.payment_id)
    return _Decision(
        "refused",
        f"not allowed from {transition.from_status} to {transition.to_status}",
        transition.payment_id,
    )


async def _decide(
    conn: Connection,
    event: ProviderEvent,
    payments: dict[uuid.UUID, Record],
    correlation_id: str | None,
) -> _Decision:
    target, payment_id = event.target, event.payment_id
    if target is None and event.refund_outcome is None:
        return _Decision(
            "ignored", f"event type {event.event_type!r} is not one this platform acts on"
        )
    if payment_id is None:
        return _Decision("rejected", f"payment_id {event.claimed_payment_id!r} is not a UUID")
    payment = payments.get(payment_id)
    if payment is None:
        return _Decision("orphaned", f"no payment {payment_id} (yet)")
    if event.reference != payment["reference"]:
        return _Decision(
            "rejected",
            f"data.reference {event.reference!r} does not match the payment's"
            f" {payment['reference']!r}",
            payment_id,
        )
    conflict = await _charge_conflict(conn, payment_id, payment, event.provider_reference)
    if conflict:
        return _Decision("rejected", conflict, payment_id)
    if target is None:
        if event.refund_id is None:
            return _Decision(
                "rejected",
                f"data.refund_id {event.claimed_refund_id!r} is not a UUID",
                payment_id,
            )
        return _Decision("applying", None, payment_id, refund=True)
    move = TransitionRequest(
        payment_id,
        target,
        TransitionSource.WEBHOOK,
        reason=f"webhook {event.provider}:{event.provider_event_id}",
        provider_reference=event.provider_reference,
        failure_reason=(event.decline_reason or "declined by the provider")
        if target is PaymentStatus.FAILED
        else None,
        correlation_id=correlation_id,
    )
    return _Decision("applying", None, payment_id, move)


async def _charge_conflict(
    conn: Connection, payment_id: uuid.UUID, payment: Record, provider_reference: str | None
) -> str | None:
    """Why the event's charge cannot be this payment's, if it cannot."""
    if provider_reference is None or provider_reference == payment["provider_reference"]:
        return None
    if payment["provider_reference"] is not None:
        return (
            f"data.provider_reference {provider_reference!r} is not the payment's charge"
            f" {payment['provider_reference']!r}"
        )
    taken_by = await charge_holder(
        conn, payment["provider"], provider_reference, other_than=payment_id
    )
    if taken_by is not None:
        return f"data.provider_reference {provider_reference!r} is another payment's charge"
    return None


async def retry_orphans(db: Database, *, batch_size: int) -> int:
    """Try due orphans again (their payment may exist now). Returns how many were tried."""

    async def retry(conn: Connection) -> int:
        rows = await lock_due_orphans(conn, batch_size)
        for row in rows:
            # Each orphan in its own savepoint: one that fails must not hold up the rest.
            try:
                async with conn.transaction():
                    outcome = await apply_event(conn, parse_event(row["raw_body"]))
            except (asyncpg.PostgresError, InvalidEvent) as exc:
                outcome = "failed"
                log.exception("orphan retry failed", extra={"event_id": str(row["id"])})
                await record_retry_failure(conn, row["id"], f"retry failed: {exc!r}"[:1000])
            WEBHOOK_EVENTS.labels(outcome=f"{outcome}_on_retry").inc()
        return len(rows)

    return await db.transaction(retry)
