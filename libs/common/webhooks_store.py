"""The webhooks schema: the provider's events as received, written and read here only.

The webhooks service owns the `webhooks` schema and writes it through this module; the
gateway reads events through it. No other module writes SQL on `webhooks.*`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence

from asyncpg import Record

from libs.common.backoff import Backoff
from libs.common.db import Connection, Database
from libs.common.inbox import Inbox

INBOX = Inbox("webhooks", "webhooks.webhook-received")
# An orphan (its payment unknown yet) is tried this many times: 2 s after it arrived,
# then 4, 8 ... at most 300 s apart. The statements pick the delay by the event's attempt
# count from this schedule.
ORPHAN_ATTEMPTS = 10
ORPHAN_BACKOFF = Backoff(base_seconds=2.0, cap_seconds=300.0)
_ORPHAN_DELAYS = ORPHAN_BACKOFF.schedule(ORPHAN_ATTEMPTS)


@dataclasses.dataclass(frozen=True, slots=True)
class NewEvent:
    id: uuid.UUID
    provider: str
    provider_event_id: str
    event_type: str
    claimed_payment_id: str
    raw_body: bytes
    headers: dict[str, str]
    signature_scheme: str
    received_at: dt.datetime
    verified_at: dt.datetime


async def store_events(conn: Connection, events: Sequence[NewEvent]) -> set[uuid.UUID]:
    """Store the events not stored before (one statement); the ids of those it stored."""
    rows = await conn.fetch(
        """
        INSERT INTO webhooks.webhook_events
            (id, provider, provider_event_id, event_type, claimed_payment_id, raw_body,
             headers, signature_scheme, received_at, verified_at)
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::bytea[], $7::jsonb[], $8::text[], $9::timestamptz[],
                             $10::timestamptz[])
        ON CONFLICT (provider, provider_event_id) DO NOTHING
        RETURNING id
        """,
        [e.id for e in events],
        [e.provider for e in events],
        [e.provider_event_id for e in events],
        [e.event_type for e in events],
        [e.claimed_payment_id for e in events],
        [e.raw_body for e in events],
        [e.headers for e in events],
        [e.signature_scheme for e in events],
        [e.received_at for e in events],
        [e.verified_at for e in events],
    )
    return {row["id"] for row in rows}


async def count_duplicates(conn: Connection, duplicates: dict[uuid.UUID, int]) -> None:
    """Add to each event's count of copies received again."""
    if not duplicates:
        return
    await conn.execute(
        """
        UPDATE webhooks.webhook_events AS e
           SET duplicates = e.duplicates + d.n, last_duplicate_at = now()
          FROM unnest($1::uuid[], $2::int[]) AS d(id, n)
         WHERE e.id = d.id
        """,
        list(duplicates),
        list(duplicates.values()),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    event_id: uuid.UUID
    status: str
    error: str | None
    payment_id: uuid.UUID | None


async def record_outcomes(conn: Connection, outcomes: Sequence[Outcome]) -> None:
    """Record what became of each event; an orphan is due again after a growing delay."""
    await conn.execute(
        """
        UPDATE webhooks.webhook_events AS e
           SET status = o.status, error = o.error, payment_id = o.payment_id,
               processed_at = now(), attempts = e.attempts + 1,
               next_attempt_at = CASE
                   WHEN o.status = 'orphaned' AND e.attempts + 1 < $5
                   THEN now() + make_interval(secs => ($6::float8[])[e.attempts + 1])
               END
          FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[])
            AS o(id, status, error, payment_id)
         WHERE e.id = o.id
        """,
        [o.event_id for o in outcomes],
        [o.status for o in outcomes],
        [o.error for o in outcomes],
        [o.payment_id for o in outcomes],
        ORPHAN_ATTEMPTS,
        _ORPHAN_DELAYS,
    )


async def lock_due_orphans(conn: Connection, limit: int) -> list[Record]:
    """(id, raw_body) of orphans due for another try, locked for this transaction."""
    return await conn.fetch(
        """
        SELECT id, raw_body FROM webhooks.webhook_events
         WHERE status = 'orphaned' AND next_attempt_at <= now()
         ORDER BY next_attempt_at
         LIMIT $1
         FOR UPDATE SKIP LOCKED
        """,
        limit,
    )


async def record_retry_failure(conn: Connection, event_id: uuid.UUID, error: str) -> None:
    """An orphan's retry failed: count the attempt and schedule the next, if any."""
    await conn.execute(
        """
        UPDATE webhooks.webhook_events
           SET attempts = attempts + 1, error = $2,
               next_attempt_at = CASE WHEN attempts + 1 < $3
                   THEN now() + make_interval(secs => ($4::float8[])[attempts + 1])
               END
         WHERE id = $1
        """,
        event_id,
        error,
        ORPHAN_ATTEMPTS,
        _ORPHAN_DELAYS,
    )


# --- reads for the API (the gateway) ------------------------------------------------------------


async def is_stored(db: Database, event_id: uuid.UUID) -> bool:
    row = await db.fetchrow("SELECT 1 FROM webhooks.webhook_events WHERE id = $1", event_id)
    return row is not None


async def event(conn: Connection, event_id: uuid.UUID) -> Record | None:
    return await conn.fetchrow(
        """
        SELECT id, provider, provider_event_id, event_type, claimed_payment_id, payment_id,
               signature_scheme, status, error, attempts, duplicates, received_at,
               processed_at, raw_body
          FROM webhooks.webhook_events
         WHERE id = $1
        """,
        event_id,
    )


async def counts_by_status(conn: Connection) -> list[Record]:
    """(status, count) from the counter table the trigger keeps."""
    return await conn.fetch(
        "SELECT status, sum(count)::bigint AS count FROM webhooks.webhook_stats GROUP BY status"
    )
