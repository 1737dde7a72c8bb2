"""On-demand reconciliation runs, and what runs did."""

from __future__ import annotations

import uuid
from typing import Any

from asyncpg import Record

from libs.common import reconciler_store
from libs.common.broker.publisher import PublishError
from libs.common.db import Connection, Database
from libs.common.errors import ApiError, service_unavailable
from libs.common.messages import ReconciliationRequested, wrap
from libs.common.reconciler_store import run_with_items
from services.gateway.intake import Publish


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
    return {"data": [run_json(row) for row in await reconciler_store.list_runs(db, limit)]}


async def get_run(db: Database, run_id: uuid.UUID) -> dict[str, Any]:
    async def read(conn: Connection) -> dict[str, Any] | None:
        found = await run_with_items(conn, run_id)
        if found is None:
            return None
        row, items = found
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
