"""The event log API: the payment events published on the bus, for consumers that were down.

`GET /api/events` pages newest first by keyset (created_at, id), so a page costs the same
however deep it is; `GET /api/events/{id}` is one event by its `message_id`. Events are
read from the outbox through the payments data's owner (libs/common/payments_store.py);
the relay keeps them at least EVENT_RETENTION_DAYS.
"""

from __future__ import annotations

import dataclasses
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
from services.gateway.listing import decode_cursor, encode_cursor, query_refused

EVENT_TYPES = frozenset(payment_event_type(status) for status in PaymentStatus)


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str | None = None
    payment_id: uuid.UUID | None = None
    created_from: AwareDatetime | None = None
    created_to: AwareDatetime | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = None


def _event_key(raw: object) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise TypeError("an event cursor's key is its row id")
    return raw


@dataclasses.dataclass(frozen=True, slots=True)
class EventsPage:
    where: EventFilter
    limit: int


def parse_events_query(params: Mapping[str, str]) -> EventsPage:
    try:
        query = EventsQuery.model_validate(dict(params))
    except ValidationError as exc:
        raise query_refused(exc) from None
    if query.type is not None and query.type not in EVENT_TYPES:
        known = ", ".join(sorted(EVENT_TYPES))
        raise ApiError(400, "invalid_query", f"type: {query.type!r} is not one of {known}.")
    where = EventFilter(
        type=query.type,
        payment_id=query.payment_id,
        created_from=query.created_from,
        created_to=query.created_to,
        before=decode_cursor(query.cursor, _event_key) if query.cursor is not None else None,
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
