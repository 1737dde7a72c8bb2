"""The event log API (GET /api/events, GET /api/events/{id}) and the bus contract
(GET /api/asyncapi.json), every answer checked against the OpenAPI document."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from urllib.parse import urlencode

from libs.common.broker.connection import Broker
from libs.common.db import Database
from libs.common.messages import PaymentEvent, decode
from libs.common.outbox import OutboxRelay
from libs.common.states import PaymentStatus, TransitionSource
from services.gateway.events import EVENT_TYPES
from tests.integration.conftest import MakeGateway
from tests.integration.gateway_client import Gateway
from tests.openapi import DOCUMENT
from tests.payments_data import create_payment
from tests.payments_data import move_to as apply_transition
from tests.unit.test_asyncapi import DOCUMENT as ASYNCAPI

P = PaymentStatus


async def completed_payment(db: Database) -> uuid.UUID:
    payment_id = uuid.uuid4()
    await db.transaction(lambda conn: create_payment(conn, payment_id))
    for to in (P.PROCESSING, P.COMPLETED):
        await db.transaction(
            lambda conn, to=to: apply_transition(
                conn, payment_id, to, source=TransitionSource.WEBHOOK
            )
        )
    return payment_id


async def test_an_event_reads_as_the_bus_message(
    gateway: Gateway, db: Database, broker: Broker
) -> None:
    payment_id = await completed_payment(db)
    page = await gateway.call("GET", f"/api/events?payment_id={payment_id}")
    assert page.status == 200
    assert [e["type"] for e in page.body["data"]] == [
        "payment.completed",
        "payment.processing",
        "payment.pending",
    ]
    assert [e["payload"]["sequence"] for e in page.body["data"]] == [3, 2, 1]
    assert all(e["published_at"] is None for e in page.body["data"])
    newest = page.body["data"][0]
    # The same envelope a consumer gets from the bus, so one decoder reads both.
    bus_fields = {k: v for k, v in newest.items() if k != "published_at"}
    envelope = decode(json.dumps(bus_fields).encode(), PaymentEvent)
    assert envelope.payload.payment_id == payment_id
    assert envelope.payload.previous_status is P.PROCESSING

    await OutboxRelay(db, broker, batch_size=10, poll_interval=1, retention_days=30).relay_once()
    one = await gateway.call("GET", f"/api/events/{newest['message_id']}")
    assert one.status == 200
    assert one.body["published_at"] is not None
    assert {k: v for k, v in one.body.items() if k != "published_at"} == bus_fields


async def test_filters_and_cursor_pages(gateway: Gateway, db: Database) -> None:
    payments = [await completed_payment(db) for _ in range(3)]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        query = {"limit": "4", **({"cursor": cursor} if cursor else {})}
        page = await gateway.call("GET", "/api/events?" + urlencode(query))
        assert page.status == 200
        seen.extend(e["message_id"] for e in page.body["data"])
        cursor = page.body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 9

    completed = await gateway.call("GET", "/api/events?type=payment.completed")
    assert {e["payload"]["payment_id"] for e in completed.body["data"]} == {
        str(p) for p in payments
    }
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    later = await gateway.call("GET", "/api/events?" + urlencode({"created_from": future}))
    assert later.body == {"data": [], "next_cursor": None}
    before = await gateway.call("GET", "/api/events?" + urlencode({"created_to": future}))
    assert len(before.body["data"]) == 9


async def test_bad_queries_are_refused_clearly(gateway: Gateway) -> None:
    for query, code in [
        ("type=payment.lost", "invalid_query"),
        ("type=payment.requested", "invalid_query"),
        ("payment_id=nope", "invalid_query"),
        ("limit=0", "invalid_query"),
        ("created_from=2026-12-01T00:00:00", "invalid_query"),
        ("cursor=bm9wZQ", "invalid_cursor"),
        ("colour=red", "unknown_parameter"),
    ]:
        answer = await gateway.call("GET", f"/api/events?{query}")
        assert answer.status == 400, query
        assert answer.body["error"] == code, query
        assert answer.body["message"]
    missing = await gateway.call("GET", f"/api/events/{uuid.uuid4()}")
    assert missing.status == 404
    assert missing.body["error"] == "event_not_found"
    malformed = await gateway.call("GET", "/api/events/not-a-uuid")
    assert malformed.status == 400
    assert malformed.body["error"] == "invalid_event_id"


async def test_the_event_log_needs_an_api_key_when_keys_are_set(
    make_gateway: MakeGateway,
) -> None:
    async with make_gateway(api_keys="key-1") as gateway:
        refused = await gateway.call("GET", "/api/events")
        assert refused.status == 401
        allowed = await gateway.call(
            "GET", "/api/events", headers={"Authorization": "Bearer key-1"}
        )
        assert allowed.status == 200


def test_the_documented_types_are_every_status_event() -> None:
    [type_parameter] = [
        p for p in DOCUMENT["paths"]["/api/events"]["get"]["parameters"] if p["name"] == "type"
    ]
    assert set(type_parameter["schema"]["enum"]) == EVENT_TYPES


async def test_the_asyncapi_document_is_served_beside_the_openapi_one(gateway: Gateway) -> None:
    answer = await gateway.call("GET", "/api/asyncapi.json")
    assert answer.status == 200
    assert answer.body == ASYNCAPI
