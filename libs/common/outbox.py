"""Events out: what an event row holds, the message it makes, and the relay that sends it.

An applied transition inserts its event into `payments.outbox` in the transition's own
statement (`insert_events_sql`, used by libs/common/state_machine.py for creation and for
every move), so the event exists exactly when the transition committed: a refused
transition, or one rolled back, leaves none.

The relay publishes the unsent events in id order, with confirms and `mandatory`, and
stamps `published_at` in the same transaction that read them. A crash before that commit
publishes them again on the next round, with the same `message_id` (at least once).

Where it runs: in the payments service, the owner of the payments data, as one more
background task of every replica. Each round takes a transaction-level advisory lock
first, so one replica relays at a time and a second one waits for its turn; the lock dies
with its transaction, so a replica killed mid-round hands over as soon as PostgreSQL sees
its connection close. One relay at a time is what keeps one payment's events in order: a
payment's transitions take its row lock, so its later event always has the higher id,
and the relay never publishes an event while an earlier one of the same payment is
unsent (a failed publish holds back the rest of that payment's events in the round).

Kept after publishing, events are the event log (`GET /api/events`, read through
libs/common/payments_store.py) until they are older than the retention; only published
events are ever pruned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
from aiohttp import web
from pydantic import ValidationError

from libs.common.broker.connection import Broker
from libs.common.broker.publisher import MessageUnroutable, PublishError
from libs.common.db import Connection, Database
from libs.common.messages import Envelope, PaymentEvent, envelope_type
from libs.common.metrics import (
    EVENTS_PUBLISHED,
    OUTBOX_BACKLOG,
    OUTBOX_OLDEST_UNSENT_AGE,
    OUTBOX_PUBLISH_FAILURES,
)

log = logging.getLogger(__name__)

# Distinct from the reconciler's run lock.
RELAY_LOCK_KEY = 0x5EC0_4C11_E000_0002
GAUGE_INTERVAL_SECONDS = 5.0
PRUNE_INTERVAL_SECONDS = 600.0
PRUNE_BATCH = 1000
MAX_BACKOFF_SECONDS = 5.0


def insert_events_sql(rows: str) -> str:
    """An INSERT of one event per row of the relation `rows`.

    `rows` has the payment's columns as the transition left them (`id`, `event_sequence`
    already raised, `status`, ...) plus `previous_status`, `source`, `reason` and
    `correlation_id`. Meant as a CTE of the statement that makes the transition.
    """
    return f"""
    INSERT INTO payments.outbox (event_id, payment_id, sequence, type, payload, correlation_id)
    SELECT gen_random_uuid(), e.id, e.event_sequence, 'payment.' || e.status,
           jsonb_build_object(
               'payment_id', e.id, 'sequence', e.event_sequence, 'status', e.status,
               'previous_status', e.previous_status, 'source', e.source, 'reason', e.reason,
               'reference', e.reference, 'amount_minor', e.amount_minor,
               'currency', e.currency, 'customer_id', e.customer_id,
               'description', e.description, 'metadata', e.metadata,
               'provider', e.provider, 'provider_reference', e.provider_reference,
               'failure_reason', e.failure_reason,
               'created_at', e.created_at, 'updated_at', e.updated_at),
           -- Every message has a correlation id; a move made outside any request's
           -- context takes its payment's id.
           coalesce(e.correlation_id, e.id::text)
      FROM {rows} AS e
    """  # noqa: S608 - `rows` is a fragment of this package's own SQL, never input


def event_envelope(row: asyncpg.Record) -> Envelope[PaymentEvent]:
    """The bus message of an outbox row: the same bytes on every publish."""
    payload = row["payload"]
    envelope = envelope_type(PaymentEvent)(
        message_id=row["event_id"],
        type=row["type"],
        version=PaymentEvent.VERSION,
        occurred_at=row["created_at"],
        correlation_id=row["correlation_id"],
        payload=PaymentEvent.model_validate(
            json.loads(payload) if isinstance(payload, str) else payload
        ),
    )
    if envelope.type != envelope.payload.message_type():
        raise ValueError(f"event {row['event_id']} is {row['type']} but its status says otherwise")
    return envelope


# --- the relay --------------------------------------------------------------------------------

_UNSENT_SQL = """
SELECT id, event_id, payment_id, type, payload, correlation_id, created_at
  FROM payments.outbox
 WHERE published_at IS NULL
 ORDER BY id
 LIMIT $1
"""

_MARK_PUBLISHED_SQL = """
UPDATE payments.outbox
   SET published_at = now(), attempts = attempts + 1, last_error = NULL
 WHERE id = ANY($1::bigint[])
"""

_MARK_FAILED_SQL = """
UPDATE payments.outbox AS o
   SET attempts = o.attempts + 1, last_error = f.error
  FROM unnest($1::bigint[], $2::text[]) AS f(id, error)
 WHERE o.id = f.id
"""


@dataclasses.dataclass(slots=True)
class RelayRound:
    """What one round did: `None` as `taken` when another replica held the turn."""

    taken: int | None = None
    published: list[int] = dataclasses.field(default_factory=list)
    failed: list[tuple[int, str]] = dataclasses.field(default_factory=list)


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        broker: Broker,
        *,
        batch_size: int,
        poll_interval: float,
        retention_days: int,
    ) -> None:
        self.db = db
        self.broker = broker
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention_days = retention_days
        # At 0 from the start, so that the first failure shows as an increase.
        for reason in ("failed", "timeout", "nacked", "unavailable", "invalid"):
            OUTBOX_PUBLISH_FAILURES.labels(reason=reason)

    async def relay_once(self) -> RelayRound:
        """Publish up to a batch of unsent events, oldest first, if it is this relay's turn."""
        if not self.broker.is_connected:
            # Reconnecting: nothing could be confirmed; do not hold a database connection.
            return RelayRound()

        async def work(conn: Connection) -> RelayRound:
            outcome = RelayRound()
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK_KEY):
                return outcome
            rows = await conn.fetch(_UNSENT_SQL, self.batch_size)
            outcome.taken = len(rows)
            if not rows:
                return outcome
            await self._publish(rows, outcome)
            if outcome.published:
                await conn.execute(_MARK_PUBLISHED_SQL, outcome.published)
            if outcome.failed:
                await conn.execute(
                    _MARK_FAILED_SQL,
                    [row_id for row_id, _ in outcome.failed],
                    [error for _, error in outcome.failed],
                )
            return outcome

        return await self.db.transaction(work)

    async def _publish(self, rows: Sequence[asyncpg.Record], outcome: RelayRound) -> None:
        by_payment: dict[uuid.UUID, list[asyncpg.Record]] = {}
        for row in rows:
            by_payment.setdefault(row["payment_id"], []).append(row)
        # Payments concurrently (the confirms overlap on the channel), each payment's
        # events one after another, so none overtakes an earlier one of its payment.
        await asyncio.gather(
            *(self._publish_in_order(events, outcome) for events in by_payment.values())
        )

    async def _publish_in_order(self, events: list[asyncpg.Record], outcome: RelayRound) -> None:
        for row in events:
            try:
                envelope = event_envelope(row)
                try:
                    await self.broker.publish(envelope, unroutable_is_failure=False)
                    EVENTS_PUBLISHED.labels(type=envelope.type, outcome="routed").inc()
                except MessageUnroutable:
                    # No queue is bound for it: nobody subscribed to this type, so there is
                    # nobody to tell. It stays readable from the event log.
                    EVENTS_PUBLISHED.labels(type=envelope.type, outcome="unroutable").inc()
            except (PublishError, ValidationError, ValueError) as exc:
                OUTBOX_PUBLISH_FAILURES.labels(reason=_reason(exc)).inc()
                outcome.failed.append((row["id"], repr(exc)[:500]))
                # Its payment's later events wait for it: they go out in sequence or not at all.
                return
            outcome.published.append(row["id"])

    async def run(self) -> None:
        """Relay until cancelled: at once while there is a backlog, else every poll interval."""
        failures = 0
        while True:
            try:
                outcome = await self.relay_once()
            except Exception:
                outcome = None
                log.exception("outbox relay round failed")
            if outcome is None or (outcome.failed and not outcome.published):
                failures += 1
                delay = min(self.poll_interval * 2**failures, MAX_BACKOFF_SECONDS)
                if outcome is not None:
                    log.warning(
                        "events not confirmed; trying again",
                        extra={"failed": len(outcome.failed), "error": outcome.failed[0][1]},
                    )
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
                continue
            failures = 0
            if outcome.taken is not None and outcome.taken >= self.batch_size:
                continue
            await asyncio.sleep(self.poll_interval)

    # --- upkeep -------------------------------------------------------------------------------

    async def measure_backlog(self) -> tuple[int, float]:
        """Set the backlog gauges; the unsent count and the oldest unsent event's age."""
        row = await self.db.fetchrow(
            "SELECT count(*) AS backlog,"
            " coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest"
            " FROM payments.outbox WHERE published_at IS NULL"
        )
        if row is None:  # pragma: no cover - an aggregate always returns a row
            return 0, 0.0
        OUTBOX_BACKLOG.set(row["backlog"])
        OUTBOX_OLDEST_UNSENT_AGE.set(row["oldest"])
        return row["backlog"], row["oldest"]

    async def prune(self) -> int:
        """Delete a batch of published events older than the retention; how many."""
        row = await self.db.fetchrow(
            """
            WITH old AS (
                SELECT id FROM payments.outbox
                 WHERE created_at < now() - make_interval(days => $1)
                   AND published_at IS NOT NULL
                 ORDER BY created_at, id
                 LIMIT $2
            ), gone AS (
                DELETE FROM payments.outbox WHERE id IN (SELECT id FROM old) RETURNING 1
            )
            SELECT count(*) AS deleted FROM gone
            """,
            self.retention_days,
            PRUNE_BATCH,
        )
        return int(row["deleted"]) if row else 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PublishError):
        return exc.reason
    return "invalid"


async def _every(interval: float, name: str, work: Callable[[], Awaitable[object]]) -> None:
    while True:
        try:
            await work()
        except Exception:
            log.warning("outbox upkeep failed", exc_info=True, extra={"task": name})
        await asyncio.sleep(interval)


RELAY = web.AppKey("outbox_relay", OutboxRelay)


def relay_context(
    make_relay: Callable[[web.Application], OutboxRelay],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The relay and its upkeep (backlog gauges, pruning) as tasks of the app."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        relay: OutboxRelay = make_relay(app)
        app[RELAY] = relay
        tasks = [
            asyncio.create_task(relay.run(), name="outbox relay"),
            asyncio.create_task(
                _every(GAUGE_INTERVAL_SECONDS, "gauges", relay.measure_backlog),
                name="outbox gauges",
            ),
            asyncio.create_task(
                _every(PRUNE_INTERVAL_SECONDS, "prune", relay.prune), name="outbox prune"
            ),
        ]
        yield
        for task in tasks:
            task.cancel()
        # A round cancelled mid-way rolls back: its events go out again on the next round.
        await asyncio.wait(tasks, timeout=5)

    return context
