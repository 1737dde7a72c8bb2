"""GET /api/payments/{id}, GET /api/payments and GET /api/payments/stats."""

from __future__ import annotations

import datetime as dt
import random
import re
import uuid
from urllib.parse import urlencode

import pytest
from aiohttp import web

from libs.common.db import Connection, Database
from libs.common.states import PaymentStatus, TransitionSource
from tests.integration.gateway_client import Gateway
from tests.openapi import DOCUMENT
from tests.payments_data import create_payment, move_to

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


async def add_payment(
    db: Database,
    *,
    minutes: int,
    amount_minor: int = 1000,
    currency: str = "USD",
    customer_id: str = "c1",
    status: PaymentStatus = PaymentStatus.PENDING,
) -> uuid.UUID:
    payment_id = uuid.uuid4()

    async def insert(conn: Connection) -> None:
        await create_payment(
            conn,
            payment_id,
            amount_minor=amount_minor,
            currency=currency,
            customer_id=customer_id,
            created_at=T0 + dt.timedelta(minutes=minutes),
        )
        if status is not PaymentStatus.PENDING:
            await move_to(conn, payment_id, status, source=TransitionSource.WEBHOOK)

    await db.transaction(insert)
    return payment_id


async def test_get_payment_shows_it_with_its_history(gateway: Gateway, db: Database) -> None:
    payment_id = await add_payment(db, minutes=0, amount_minor=12345, status=PaymentStatus.FAILED)
    await db.transaction(
        lambda conn: move_to(
            conn, payment_id, PaymentStatus.COMPLETED, source=TransitionSource.WEBHOOK
        )
    )

    answer = await gateway.call("GET", f"/api/payments/{payment_id}")

    assert answer.status == 200
    body = answer.body
    assert body["id"] == str(payment_id)
    assert body["amount"] == "123.45"
    assert body["status"] == "failed"
    assert [(e["from_status"], e["to_status"], e["applied"]) for e in body["events"]] == [
        (None, "pending", True),
        ("pending", "failed", True),
        ("failed", "completed", False),
    ]


async def test_get_unknown_or_malformed_id(gateway: Gateway) -> None:
    missing = await gateway.call("GET", f"/api/payments/{uuid.uuid4()}")
    assert (missing.status, missing.body["error"]) == (404, "payment_not_found")
    malformed = await gateway.call("GET", "/api/payments/not-a-uuid")
    assert (malformed.status, malformed.body["error"]) == (400, "invalid_payment_id")


async def test_list_filters_and_pages_newest_first(gateway: Gateway, db: Database) -> None:
    ids = [
        await add_payment(
            db,
            minutes=i,
            customer_id="alice" if i % 2 else "bob",
            status=PaymentStatus.COMPLETED if i % 3 == 0 else PaymentStatus.PENDING,
        )
        for i in range(25)
    ]
    newest_first = [str(i) for i in reversed(ids)]

    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": "10", **({"cursor": cursor} if cursor else {})}
        page = await gateway.call("GET", f"/api/payments?{urlencode(query)}")
        assert page.status == 200
        seen += [p["id"] for p in page.body["data"]]
        cursor = page.body["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first

    alice = await gateway.call("GET", "/api/payments?customer_id=alice&limit=100")
    assert [p["id"] for p in alice.body["data"]] == [
        str(ids[i]) for i in reversed(range(25)) if i % 2
    ]
    completed = await gateway.call("GET", "/api/payments?status=completed&limit=100")
    assert [p["id"] for p in completed.body["data"]] == [
        str(ids[i]) for i in reversed(range(25)) if i % 3 == 0
    ]
    window = urlencode(
        {
            "created_from": (T0 + dt.timedelta(minutes=5)).isoformat(),
            "created_to": (T0 + dt.timedelta(minutes=8)).isoformat(),
        }
    )
    in_window = await gateway.call("GET", f"/api/payments?{window}")
    assert [p["id"] for p in in_window.body["data"]] == [str(ids[i]) for i in (7, 6, 5)]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "invalid_query"),
        ("limit=101", "invalid_query"),
        ("limit=ten", "invalid_query"),
        ("status=lost", "invalid_query"),
        ("created_from=yesterday", "invalid_query"),
        ("created_from=2026-11-01T00:00:00", "invalid_query"),
        ("cursor=not-a-cursor", "invalid_cursor"),
        ("colour=red", "unknown_parameter"),
    ],
)
async def test_list_refuses_bad_parameters(gateway: Gateway, query: str, code: str) -> None:
    answer = await gateway.call("GET", f"/api/payments?{query}")
    assert (answer.status, answer.body["error"]) == (400, code)


async def test_stats_add_up_to_the_truth(gateway: Gateway, db: Database) -> None:
    rng = random.Random(7)
    truth: dict[tuple[str, str], list[int]] = {}
    for i in range(60):
        currency = rng.choice(["USD", "EUR", "JPY"])
        # partially_refunded is reached from completed only, by a refund (test_gateway_refunds).
        status = rng.choice([s for s in PaymentStatus if s is not PaymentStatus.PARTIALLY_REFUNDED])
        amount = rng.randint(1, 100_000)
        await add_payment(db, minutes=i, amount_minor=amount, currency=currency, status=status)
        # Refunds need a completed payment first; add_payment allows pending -> refunded.
        truth.setdefault((status.value, currency), []).append(amount)

    answer = await gateway.call("GET", "/api/payments/stats")

    assert answer.status == 200
    payments = answer.body["payments"]
    assert payments["total"] == 60
    for status in PaymentStatus:
        expected_count = sum(len(v) for (s, _), v in truth.items() if s == status.value)
        assert payments["by_status"][status.value]["count"] == expected_count
    by_currency = {
        c: sum(sum(v) for (_, cur), v in truth.items() if cur == c) for c in ("USD", "EUR", "JPY")
    }
    assert payments["by_currency"]["JPY"]["amount"] == str(by_currency["JPY"])
    assert payments["by_currency"]["USD"]["amount"] == f"{by_currency['USD'] / 100:.2f}"
    paid = ("completed", "partially_refunded", "refunded")
    succeeded = sum(len(v) for (s, _), v in truth.items() if s in paid)
    settled = succeeded + sum(len(v) for (s, _), v in truth.items() if s == "failed")
    assert payments["success_rate"] == round(succeeded / settled, 4)
    assert answer.body["webhooks"] == {"total": 0, "by_status": {}}
    assert answer.body["last_reconciliation"] is None


async def test_every_route_is_documented_and_every_documented_route_exists(
    gateway: Gateway,
) -> None:
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in gateway.app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        # Swagger UI's own files, served for /api/docs.
        and not isinstance(route.resource, web.StaticResource)
    }
    documented = {(method, path) for path, item in DOCUMENT["paths"].items() for method in item}
    assert served == documented


async def test_openapi_document_is_served(gateway: Gateway) -> None:
    answer = await gateway.call("GET", "/api/openapi.json")
    assert answer.status == 200
    assert answer.body == DOCUMENT


async def test_docs_are_browsable_without_any_other_host(gateway: Gateway) -> None:
    page = await gateway.call("GET", "/api/docs")
    assert page.status == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.body)
    assert assets
    for asset in assets:
        assert asset.startswith("/api/docs/"), f"{asset} is not served by the gateway"
        async with gateway.client.get(asset) as response:
            assert response.status == 200, asset
            assert len(await response.read()) > 100
    script = await gateway.call("GET", "/api/docs/initializer.js")
    assert '"/api/openapi.json"' in script.body
