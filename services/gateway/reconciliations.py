"""On-demand reconciliation runs, and what runs did."""

from __future__ import annotations

import uuid
from typing import Any

from asyncpg import Record

from libs.common.broker.publisher import PublishError
from libs.common.db import Connection, Database
from libs.common.errors import ApiError, service_unavailable
from libs.common.messages import ReconciliationRequested, wrap
from services.gateway.intake import Publish

_RUN_COLUMNS = """
    id, trigger, status, started_at, finished_at, checked, updated, unchanged, errors,
    error_details, duration_ms
"""


def run_json(row: Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "trigger": row["trigger"],
        "status": row["status"],
        "started_at": row["started_at"].isoformat(),
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
        "checked": row["checked"],
        "updated": row["updated"],
        "unchanged": row["unchanged"],
        "errors": row["errors"],
        "error_details": row["error_details"],
        "duration_ms": row["duration_ms"],
    }


async def request_run(publish: Publish) -> dict[str, Any]:
    run_id = uuid.uuid4()
    try:
        await publish(
            wrap(ReconciliationRequested(run_id=run_id, trigger="manual"), message_id=run_id)
        )
    except PublishError as exc:
        raise service_unavailable(
            "broker_unavailable", "The run was not requested; retry in a moment."
        ) from exc
    return {"id": str(run_id), "status": "requested", "trigger": "manual"}


def parse_run_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "invalid_run_id", "A run id is a UUID.") from None


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return 20
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ApiError(400, "invalid_query", "limit must be a whole number from 1 to 100.")
    return int(raw)


async def list_runs(db: Database, limit: int) -> dict[str, Any]:
    rows = await db.fetch(
        f"SELECT {_RUN_COLUMNS} FROM reconciler.reconciliation_logs"  # noqa: S608 - constant columns
        " ORDER BY started_at DESC LIMIT $1",
        limit,
    )
    return {"data": [run_json(row) for row in rows]}


async def get_run(db: Database, run_id: uuid.UUID) -> dict[str, Any]:
    async def read(conn: Connection) -> dict[str, Any] | None:
        row = await conn.fetchrow(
            f"SELECT {_RUN_COLUMNS} FROM reconciler.reconciliation_logs WHERE id = $1",  # noqa: S608 - constant columns
            run_id,
        )
        if row is None:
            return None
        items = await conn.fetch(
            "SELECT payment_id, from_status, to_status, reason, created_at"
            " FROM reconciler.reconciliation_items WHERE run_id = $1 ORDER BY id",
            run_id,
        )
        return {
            **run_json(row),
            "changes": [
                {
                    "payment_id": str(item["payment_id"]),
                    "from_status": item["from_status"],
                    "to_status": item["to_status"],
                    "reason": item["reason"],
                    "at": item["created_at"].isoformat(),
                }
                for item in items
            ],
        }

    run = await db.transaction(read)
    if run is None:
        raise ApiError(
            404,
            "run_not_found",
            f"No run {run_id}. A run requested a moment ago appears once it starts.",
        )
    return run
