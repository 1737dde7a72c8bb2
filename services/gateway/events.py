"""The event log API: the payment events published on the bus, for consumers that were down.

`GET /api/events` pages newest first by keyset (created_at, id), so a page costs the same
however deep it is; `GET /api/events/{id}` is one event by its `message_id`. Events are
read from the outbox through the payments data's owner (libs/common/payments_store.py);
the relay keeps them at least EVENT_RETENTION_DAYS.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Any

from asyncpg import Record
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from libs.common.db import Database
from libs.common.errors import ApiError
from libs.common.messages import payment_event_type
from libs.common.outbox import event_envelope
from libs.common.payments_store import EventFilter, event_by_id, list_events
from libs.common.states import PaymentStatus

EVENT_TYPES = frozenset(payment_event_type(status) for status in PaymentStatus)


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str | None = None
    payment_id: uuid.UUID | None = None
    created_from: AwareDatetime | None = None
    created_to: AwareDatetime | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = None


def _invalid(exc: ValidationError) -> ApiError:
    details = [
        {
            "field": ".".join(str(p) for p in e["loc"]),
            "code": "unknown_parameter" if e["type"] == "extra_forbidden" else "invalid_value",
            "message": e["msg"],
        }
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0]
    return ApiError(
        400,
        first["code"] if first["code"] == "unknown_parameter" else "invalid_query",
        f"{first['field']}: {first['message']}.",
        details=details,
    )


def encode_cursor(created_at: dt.datetime, row_id: int) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, int]:
    invalid = ApiError(400, "invalid_cursor", "cursor must be a next_cursor from an earlier page.")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, row_id = json.loads(raw)
        position = dt.datetime.fromisoformat(created_at), row_id
    except (ValueError, TypeError, binascii.Error):
        raise invalid from None
    if position[0].tzinfo is None or not isinstance(row_id, int) or isinstance(row_id, bool):
        raise invalid
    return position


@dataclasses.dataclass(frozen=True, slots=True)
class EventsPage:
    where: EventFilter
    limit: int


def parse_events_query(params: Mapping[str, str]) -> EventsPage:
    try:
        query = EventsQuery.model_validate(dict(params))
    except ValidationError as exc:
        raise _invalid(exc) from None
    if query.type is not None and query.type not in EVENT_TYPES:
        known = ", ".join(sorted(EVENT_TYPES))
        raise ApiError(400, "invalid_query", f"type: {query.type!r} is not one of {known}.")
    where = EventFilter(
        type=query.type,
        payment_id=query.payment_id,
        created_from=query.created_from,
        created_to=query.created_to,
        before=decode_cursor(query.cursor) if query.cursor is not None else None,
    )
    return EventsPage(where, query.limit)


def parse_event_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "invalid_event_id", "An event id is a UUID (its message_id).") from None


def event_json(row: Record) -> dict[str, Any]:
    """An event as the API shows it: the bus message, and when it was published."""
    return {
        **event_envelope(row).model_dump(mode="json"),
        "published_at": row["published_at"].isoformat() if row["published_at"] else None,
    }


async def events_page(db: Database, page: EventsPage) -> dict[str, Any]:
    rows = await list_events(db, page.where, page.limit + 1)
    shown = rows[: page.limit]
    more = len(rows) > page.limit
    return {
        "data": [event_json(row) for row in shown],
        "next_cursor": encode_cursor(shown[-1]["created_at"], shown[-1]["id"]) if more else None,
    }


async def one_event(db: Database, event_id: uuid.UUID) -> dict[str, Any]:
    row = await event_by_id(db, event_id)
    if row is None:
        raise ApiError(404, "event_not_found", f"No event {event_id} (or it is past retention).")
    return event_json(row)
