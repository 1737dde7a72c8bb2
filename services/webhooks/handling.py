"""What the webhooks service does with a verified provider callback.

One transaction per message: claim the message in the inbox, store the event once
(keyed by provider and provider event id; a repeat only bumps its duplicate count), and
apply it to the payment through the shared state machine. So a redelivered message or a
resent webhook never applies twice, and an event is never applied without being stored.

What can become of an event:
- applied: the payment moved;
- refused: the move was not allowed (a late or out-of-order event: failed after
  completed, processing after completed); recorded in the payment's audit trail;
- rejected: it names no valid payment id, or a payment whose reference (or charge)
  differs from the event's;
- ignored: an event type this platform does not act on;
- orphaned: no such payment yet (the webhook beat the payment). Tried again with a
  growing delay; if the payment never appears it stays orphaned, counted and visible.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

import asyncpg
from asyncpg import Record

from libs.common.broker.consumer import PoisonMessage
from libs.common.db import Connection, Database
from libs.common.inbox import Inbox
from libs.common.messages import Envelope, WebhookReceived
from libs.common.state_machine import apply_transition
from libs.common.states import PaymentStatus, TransitionSource
from libs.common.webhook_events import InvalidEvent, ProviderEvent, parse_event
from services.webhooks.metrics import WEBHOOK_EVENTS

log = logging.getLogger(__name__)

INBOX = Inbox("webhooks", "webhooks.webhook-received")
ORPHAN_ATTEMPTS = 10
MAX_ORPHAN_DELAY_SECONDS = 300


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookIntake:
    db: Database

    async def handle(self, envelope: Envelope[WebhookReceived]) -> None:
        try:
            event = parse_event(envelope.payload.raw_body)
        except InvalidEvent as exc:
            # The gateway checked the same; a body that fails here cannot succeed later.
            raise PoisonMessage(f"unreadable webhook body: {exc.message}") from exc
        outcome = await self.db.transaction(lambda conn: record_and_apply(conn, envelope, event))
        WEBHOOK_EVENTS.labels(outcome=outcome).inc()
        log.info(
            "webhook event handled",
            extra={"event_id": str(event.id), "event_type": event.event_type, "outcome": outcome},
        )


async def record_and_apply(
    conn: Connection, envelope: Envelope[WebhookReceived], event: ProviderEvent
) -> str:
    if not await INBOX.claim(conn, envelope):
        return "redelivered"
    received = envelope.payload
    inserted = await conn.fetchval(
        """
        INSERT INTO webhooks.webhook_events
            (id, provider, provider_event_id, event_type, claimed_payment_id, raw_body,
             headers, signature_scheme, received_at, verified_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT (provider, provider_event_id) DO NOTHING
        RETURNING true
        """,
        event.id,
        event.provider,
        event.provider_event_id,
        event.event_type,
        event.claimed_payment_id,
        received.raw_body,
        received.headers,
        received.signature_scheme,
        received.received_at,
        received.verified_at,
    )
    if not inserted:
        await conn.execute(
            "UPDATE webhooks.webhook_events"
            " SET duplicates = duplicates + 1, last_duplicate_at = now() WHERE id = $1",
            event.id,
        )
        return "duplicate"
    return await apply_event(conn, event)


async def apply_event(conn: Connection, event: ProviderEvent) -> str:
    """Apply a stored event to its payment and record the outcome on the event."""
    status, error, payment_id = await _decide(conn, event)
    await conn.execute(
        """
        UPDATE webhooks.webhook_events
           SET status = $2, error = $3, payment_id = $4, processed_at = now(),
               attempts = attempts + 1,
               next_attempt_at = CASE
                   WHEN $2 = 'orphaned' AND attempts + 1 < $5
                   THEN now() + make_interval(secs => least(power(2, attempts + 1), $6))
               END
         WHERE id = $1
        """,
        event.id,
        status,
        error,
        payment_id,
        ORPHAN_ATTEMPTS,
        MAX_ORPHAN_DELAY_SECONDS,
    )
    return status


async def _decide(
    conn: Connection, event: ProviderEvent
) -> tuple[str, str | None, uuid.UUID | None]:
    target, payment_id = event.target, event.payment_id
    if target is None:
        return "ignored", f"event type {event.event_type!r} is not one this platform acts on", None
    if payment_id is None:
        return "rejected", f"payment_id {event.claimed_payment_id!r} is not a UUID", None
    payment = await conn.fetchrow(
        "SELECT reference, provider, provider_reference FROM payments.payments WHERE id = $1",
        payment_id,
    )
    if payment is None:
        return "orphaned", f"no payment {payment_id} (yet)", None
    if event.reference != payment["reference"]:
        return (
            "rejected",
            f"data.reference {event.reference!r} does not match the payment's"
            f" {payment['reference']!r}",
            payment_id,
        )
    conflict = await _charge_conflict(conn, payment_id, payment, event.provider_reference)
    if conflict:
        return "rejected", conflict, payment_id
    transition = await apply_transition(
        conn,
        payment_id,
        target,
        source=TransitionSource.WEBHOOK,
        reason=f"webhook {event.provider}:{event.provider_event_id}",
        provider_reference=event.provider_reference,
        failure_reason=(event.decline_reason or "declined by the provider")
        if target is PaymentStatus.FAILED
        else None,
    )
    if transition.applied:
        return "applied", None, payment_id
    return "refused", f"not allowed from {transition.from_status} to {target}", payment_id


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
    taken_by = await conn.fetchval(
        "SELECT id FROM payments.payments"
        " WHERE provider IS NOT DISTINCT FROM $1 AND provider_reference = $2 AND id <> $3",
        payment["provider"],
        provider_reference,
        payment_id,
    )
    if taken_by is not None:
        return f"data.provider_reference {provider_reference!r} is another payment's charge"
    return None


async def retry_orphans(db: Database, *, batch_size: int) -> int:
    """Try due orphans again (their payment may exist now). Returns how many were tried."""

    async def retry(conn: Connection) -> int:
        rows = await conn.fetch(
            """
            SELECT id, raw_body FROM webhooks.webhook_events
             WHERE status = 'orphaned' AND next_attempt_at <= now()
             ORDER BY next_attempt_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
            """,
            batch_size,
        )
        for row in rows:
            # Each orphan in its own savepoint: one that fails must not hold up the rest.
            try:
                async with conn.transaction():
                    outcome = await apply_event(conn, parse_event(row["raw_body"]))
            except (asyncpg.PostgresError, InvalidEvent) as exc:
                outcome = "failed"
                log.exception("orphan retry failed", extra={"event_id": str(row["id"])})
                await conn.execute(
                    """
                    UPDATE webhooks.webhook_events
                       SET attempts = attempts + 1, error = $2,
                           next_attempt_at = CASE WHEN attempts + 1 < $3
                               THEN now() + make_interval(secs => least(power(2, attempts + 1), $4))
                           END
                     WHERE id = $1
                    """,
                    row["id"],
                    f"retry failed: {exc!r}"[:1000],
                    ORPHAN_ATTEMPTS,
                    MAX_ORPHAN_DELAY_SECONDS,
                )
            WEBHOOK_EVENTS.labels(outcome=f"{outcome}_on_retry").inc()
        return len(rows)

    return await db.transaction(retry)
