"""Read side of the API: one payment, a filtered page of payments, and the stats.

Lists page by keyset (created_at, id), newest first, so a page costs the same however
deep it is, and the cursor stays valid while new payments arrive. Stats add up the
counter tables the database keeps by trigger, so they cost the same at 1M payments as
at ten.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from asyncpg import Record
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from libs.common import payments_store
from libs.common.db import Connection, Database
from libs.common.errors import ApiError
from libs.common.money import format_minor_units
from libs.common.payments_store import (
    PaymentFilter,
    counts_by_status_and_currency,
    payment_with_events,
)
from libs.common.reconciler_store import latest_run
from libs.common.refunds import refunded_by_currency
from libs.common.states import PaymentStatus
from libs.common.webhooks_store import counts_by_status
from services.gateway.listing import decode_cursor, encode_cursor, query_refused
from services.gateway.reconciliations import run_json


def payment_json(row: Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "reference": row["reference"],
        "status": row["status"],
        "amount": format_minor_units(row["amount_minor"], row["currency"]),
        "currency": row["currency"],
        "customer_id": row["customer_id"],
        "description": row["description"],
        "metadata": row["metadata"],
        "provider": row["provider"],
        "provider_reference": row["provider_reference"],
        "failure_reason": row["failure_reason"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }


def parse_payment_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "invalid_payment_id", "A payment id is a UUID.") from None


async def get_payment(db: Database, payment_id: uuid.UUID) -> dict[str, Any]:
    async def read(conn: Connection) -> dict[str, Any] | None:
        found = await payment_with_events(conn, payment_id)
        if found is None:
            return None
        row, events = found
        return {
            **payment_json(row),
            "events": [
                {
                    "from_status": e["from_status"],
                    "to_status": e["to_status"],
                    "applied": e["applied"],
                    "source": e["source"],
                    "reason": e["reason"],
                    "at": e["created_at"].isoformat(),
                }
                for e in events
            ],
        }

    payment = await db.transaction(read)
    if payment is None:
        raise ApiError(
            404,
            "payment_not_found",
            f"No payment {payment_id}. One accepted a moment ago may take a second to appear.",
        )
    return payment


# --- listing ----------------------------------------------------------------------------------


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: PaymentStatus | None = None
    customer_id: str | None = Field(default=None, min_length=1, max_length=128)
    created_from: AwareDatetime | None = None
    created_to: AwareDatetime | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = None


def parse_list_query(params: Mapping[str, str]) -> ListQuery:
    try:
        return ListQuery.model_validate(dict(params))
    except ValidationError as exc:
        raise query_refused(exc) from None


def _payment_key(raw: object) -> uuid.UUID:
    if not isinstance(raw, str):
        raise TypeError("a payment cursor's key is its id as text")
    return uuid.UUID(raw)


async def list_payments(db: Database, query: ListQuery) -> dict[str, Any]:
    before = decode_cursor(query.cursor, _payment_key) if query.cursor is not None else None
    rows = await payments_store.list_payments(
        db,
        PaymentFilter(
            status=query.status,
            customer_id=query.customer_id,
            created_from=query.created_from,
            created_to=query.created_to,
            before=before,
        ),
        query.limit + 1,
    )
    page = rows[: query.limit]
    more = len(rows) > query.limit
    return {
        "data": [payment_json(row) for row in page],
        "next_cursor": encode_cursor(page[-1]["created_at"], str(page[-1]["id"])) if more else None,
    }


# --- stats ------------------------------------------------------------------------------------


async def payment_stats(db: Database) -> dict[str, Any]:
    async def read(
        conn: Connection,
    ) -> tuple[list[Record], list[Record], Record | None, list[Record]]:
        payments = await counts_by_status_and_currency(conn)
        webhooks = await counts_by_status(conn)
        last_run = await latest_run(conn)
        return payments, webhooks, last_run, await refunded_by_currency(conn)

    payment_rows, webhook_rows, last_run, refund_rows = await db.transaction(read)

    by_status: dict[str, dict[str, Any]] = {
        s.value: {"count": 0, "amounts": {}} for s in PaymentStatus
    }
    by_currency: dict[str, dict[str, Any]] = {}
    minor_by_currency: dict[str, int] = {}
    for row in payment_rows:
        if row["count"] == 0:
            continue
        status, currency = row["status"], row["currency"]
        by_status[status]["count"] += row["count"]
        by_status[status]["amounts"][currency] = format_minor_units(row["amount_minor"], currency)
        entry = by_currency.setdefault(currency, {"count": 0})
        entry["count"] += row["count"]
        minor_by_currency[currency] = minor_by_currency.get(currency, 0) + row["amount_minor"]
    for currency, minor in minor_by_currency.items():
        by_currency[currency]["amount"] = format_minor_units(minor, currency)

    succeeded = sum(by_status[s]["count"] for s in ("completed", "partially_refunded", "refunded"))
    settled = succeeded + by_status["failed"]["count"]
    webhooks = {row["status"]: row["count"] for row in webhook_rows if row["count"]}
    return {
        "payments": {
            "total": sum(s["count"] for s in by_status.values()),
            "by_status": by_status,
            "by_currency": by_currency,
            # Of the payments that reached an outcome, the share that were paid.
            "success_rate": round(succeeded / settled, 4) if settled else None,
        },
        "refunds": _refund_stats(refund_rows),
        "webhooks": {"total": sum(webhooks.values()), "by_status": webhooks},
        "last_reconciliation": run_json(last_run) if last_run else None,
    }


def _refund_stats(rows: list[Record]) -> dict[str, Any]:
    """Refunded (succeeded) amounts by currency, and what is still pending, apart."""
    result: dict[str, dict[str, Any]] = {"refunded": {}, "pending": {}}
    for row in rows:
        target = result["refunded" if row["status"] == "succeeded" else "pending"]
        target[row["currency"]] = {
            "count": row["count"],
            "amount": format_minor_units(row["amount_minor"], row["currency"]),
        }
    return result
