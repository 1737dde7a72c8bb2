"""The reconciler schema: what reconciliation runs did, written and read here only.

The reconciler service owns the `reconciler` schema and writes it through this module;
the gateway reads runs through it. No other module writes SQL on `reconciler.*`.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from typing import Literal

from asyncpg import Record

from libs.common.db import Connection, Database
from libs.common.inbox import Inbox
from libs.common.logs import get_correlation_id

Trigger = Literal["cron", "manual"]
MAX_ERROR_DETAILS = 100

# The reconciler's consumer of `reconciliation.requested` claims its message here in the
# transaction that records the run as over.
INBOX = Inbox("reconciler", "reconciler.reconciliation-requested")


@dataclasses.dataclass
class RunSummary:
    run_id: uuid.UUID
    trigger: Trigger
    status: str = "running"
    checked: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: int = 0
    # The first MAX_ERROR_DETAILS errors, each with the payment it concerns.
    error_details: list[dict[str, str]] = dataclasses.field(default_factory=list)
    duration_ms: int = 0

    def add_error(self, payment_id: str, error: str) -> None:
        self.errors += 1
        if len(self.error_details) < MAX_ERROR_DETAILS:
            self.error_details.append({"payment_id": payment_id, "error": error})


async def record_run(conn: Connection, summary: RunSummary, *, finished: bool) -> None:
    """Insert or update the run's row; a `skipped` record never replaces an existing run."""
    await conn.execute(
        """
        INSERT INTO reconciler.reconciliation_logs
            (id, trigger, status, checked, updated, unchanged, errors, error_details,
             duration_ms, correlation_id, finished_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                CASE WHEN $11 THEN now() END)
        ON CONFLICT (id) DO UPDATE
           SET status = EXCLUDED.status, checked = EXCLUDED.checked,
               updated = EXCLUDED.updated, unchanged = EXCLUDED.unchanged,
               errors = EXCLUDED.errors, error_details = EXCLUDED.error_details,
               duration_ms = EXCLUDED.duration_ms, finished_at = EXCLUDED.finished_at
         WHERE EXCLUDED.status <> 'skipped'
        """,
        summary.run_id,
        summary.trigger,
        summary.status,
        summary.checked,
        summary.updated,
        summary.unchanged,
        summary.errors,
        summary.error_details,
        summary.duration_ms if finished else None,
        get_correlation_id(),
        finished,
    )


async def close_interrupted(conn: Connection, run_id: uuid.UUID) -> None:
    """Mark the run failed if it is still `running`: the process running it died."""
    await conn.execute(
        """
        UPDATE reconciler.reconciliation_logs
           SET status = 'failed', finished_at = now(), errors = errors + 1,
               error_details = error_details || jsonb_build_array(jsonb_build_object(
                   'payment_id', '',
                   'error', 'interrupted: the process running it stopped, and when'
                            ' the request came back another run was in progress'))
         WHERE id = $1 AND status = 'running'
        """,
        run_id,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """A payment a run moved."""

    payment_id: uuid.UUID
    from_status: str
    to_status: str
    reason: str


async def record_items(conn: Connection, run_id: uuid.UUID, items: Sequence[Item]) -> None:
    if not items:
        return
    await conn.execute(
        """
        INSERT INTO reconciler.reconciliation_items
            (run_id, payment_id, from_status, to_status, reason)
        SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[])
        """,
        run_id,
        [i.payment_id for i in items],
        [i.from_status for i in items],
        [i.to_status for i in items],
        [i.reason for i in items],
    )


async def last_completed_at(db: Database) -> float | None:
    """When the last completed run finished (epoch seconds); None before the first."""
    row = await db.fetchrow(
        "SELECT extract(epoch FROM max(finished_at)) AS at FROM reconciler.reconciliation_logs"
        " WHERE status = 'completed'"
    )
    return None if row is None or row["at"] is None else float(row["at"])


# --- reads for the API (the gateway) ------------------------------------------------------------

RUN_COLUMNS = (
    "id, trigger, status, started_at, finished_at, checked, updated, unchanged, errors,"
    " error_details, duration_ms"
)


async def list_runs(db: Database, limit: int) -> list[Record]:
    """The latest runs, newest first."""
    return await db.fetch(
        f"SELECT {RUN_COLUMNS} FROM reconciler.reconciliation_logs"  # noqa: S608 - constant columns
        " ORDER BY started_at DESC LIMIT $1",
        limit,
    )


async def latest_run(conn: Connection) -> Record | None:
    return await conn.fetchrow(
        f"SELECT {RUN_COLUMNS} FROM reconciler.reconciliation_logs"  # noqa: S608 - constant columns
        " ORDER BY started_at DESC LIMIT 1"
    )


async def run_with_items(conn: Connection, run_id: uuid.UUID) -> tuple[Record, list[Record]] | None:
    """The run and the payments it moved, in order; None when there is no such run.

    Run it in a transaction, so both reads see the same moment."""
    row = await conn.fetchrow(
        f"SELECT {RUN_COLUMNS} FROM reconciler.reconciliation_logs WHERE id = $1",  # noqa: S608 - constant columns
        run_id,
    )
    if row is None:
        return None
    items = await conn.fetch(
        "SELECT payment_id, from_status, to_status, reason, created_at"
        " FROM reconciler.reconciliation_items WHERE run_id = $1 ORDER BY id",
        run_id,
    )
    return row, items
