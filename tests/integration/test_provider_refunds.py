"""The simulated PSP's refunds against a real database and a real webhook receiver."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

import aiohttp

from libs.common.db import Database
from libs.common.signing import Scheme, verify
from services.provider.refunds import settle_due
from services.provider.simulation import Simulation
from tests.integration.test_provider import (
    SECRETS,
    Client,
    MakeSettings,
    Receiver,
    create,
    db,
    make_settings,
    provider,
    receiver,
    running,
    settled,
)
from tests.support import eventually

# Fixtures used by name below (imported so pytest finds them in this module).
__all__ = ["db", "make_settings", "provider", "receiver"]

REFUND_ID = re.compile(r"^re_[0-9a-f]{24}$")


async def succeeded_charge(client: Client, amount_minor: int = 10000) -> dict[str, Any]:
    charge = await create(client, amount_minor=amount_minor)
    return await eventually(lambda: settled(client, charge["id"]), within=10)


def refund_body(charge: dict[str, Any], **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "charge_id": charge["id"],
        "reference": str(uuid.uuid4()),
        "amount_minor": 2500,
        "currency": charge["currency"],
    }
    return body | changes


async def post_refund(
    client: Client, body: Any, key: str | None = "reference"
) -> aiohttp.ClientResponse:
    headers = {}
    if key is not None:
        headers["Idempotency-Key"] = body["reference"] if key == "reference" else key
    return await client.post("/refunds", data=json.dumps(body).encode(), headers=headers)


async def refund_rows(db: Database) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch("SELECT * FROM provider.refunds ORDER BY created_at")]


async def test_a_refund_is_created_processing_and_settles_with_a_signed_webhook(
    provider: Client, db: Database, receiver: Receiver
) -> None:
    charge = await succeeded_charge(provider)
    body = refund_body(charge)

    response = await post_refund(provider, body)

    assert response.status == 201, await response.text()
    refund = await response.json()
    assert REFUND_ID.match(refund["id"])
    assert refund["status"] == "processing"
    assert refund["payment_id"] == charge["payment_id"]
    assert {k: refund[k] for k in body} == body
    assert response.headers["Location"] == f"/refunds/{refund['id']}"

    async def final() -> dict[str, Any] | None:
        answer = await (await provider.get(f"/refunds/{refund['id']}")).json()
        return None if answer["status"] == "processing" else answer

    done = await eventually(final, within=10)
    assert done["status"] == "succeeded"
    assert done["settled_at"] is not None

    def refund_webhook() -> Any:
        for request in receiver.requests:
            event = json.loads(request.body)
            if event["event_type"] == "refund.succeeded":
                return request, event
        return None

    request, event = await eventually(refund_webhook, within=10)
    assert verify(request.body, request.headers, SECRETS) in (Scheme.SEED, Scheme.STANDARD)
    assert event["payment_id"] == charge["payment_id"]
    assert event["data"] == {
        "reference": charge["reference"],
        "provider_reference": charge["id"],
        "refund_id": body["reference"],
        "provider_refund_id": refund["id"],
        "amount_minor": 2500,
        "currency": "USD",
        "status": "succeeded",
        "failure_reason": None,
    }
    [delivery] = await db.fetch(
        "SELECT refund_id, charge_id FROM provider.webhook_deliveries WHERE event_type = $1",
        "refund.succeeded",
    )
    assert (delivery["refund_id"], delivery["charge_id"]) == (refund["id"], charge["id"])


async def test_the_same_key_replays_and_another_body_is_refused(
    provider: Client, db: Database
) -> None:
    charge = await succeeded_charge(provider)
    body = refund_body(charge)
    first = await post_refund(provider, body)
    again = await post_refund(provider, body)
    other = await post_refund(provider, body | {"amount_minor": 1})

    assert first.status == 201
    assert again.status == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == await first.json()
    assert other.status == 422
    assert (await other.json())["error"] == "idempotency_key_reused"
    assert len(await refund_rows(db)) == 1


async def test_refunds_never_add_up_to_more_than_the_charge(provider: Client, db: Database) -> None:
    charge = await succeeded_charge(provider, amount_minor=1000)
    # 30 concurrent refunds of 100 against a charge of 1000: exactly ten fit.
    answers = await asyncio.gather(
        *(post_refund(provider, refund_body(charge, amount_minor=100)) for _ in range(30))
    )
    statuses = sorted(a.status for a in answers)
    assert statuses == [201] * 10 + [422] * 20
    refused = [await a.json() for a in answers if a.status == 422]
    assert {r["error"] for r in refused} == {"amount_exceeds_refundable"}
    rows = await refund_rows(db)
    assert sum(r["amount_minor"] for r in rows) == 1000


async def test_refusals_store_nothing(provider: Client, db: Database) -> None:
    declined = await create(provider, customer_id="decline_me")
    charge = await succeeded_charge(provider)
    cases = [
        (refund_body(declined), 409, "charge_not_refundable"),
        (refund_body(charge, charge_id="ch_nope"), 404, "charge_not_found"),
        (refund_body(charge, currency="EUR"), 422, "currency_mismatch"),
        (refund_body(charge, amount_minor=10001), 422, "amount_exceeds_refundable"),
        (refund_body(charge, amount_minor=0), 400, "validation_error"),
        (refund_body(charge, amount_minor="5"), 400, "validation_error"),
    ]
    for body, status, code in cases:
        response = await post_refund(provider, body)
        assert response.status == status, (body, await response.text())
        assert (await response.json())["error"] == code
    missing_key = await post_refund(provider, refund_body(charge), key=None)
    assert missing_key.status == 400
    assert await refund_rows(db) == []


async def test_found_by_reference_and_by_charge(provider: Client) -> None:
    charge = await succeeded_charge(provider)
    body = refund_body(charge)
    created = await (await post_refund(provider, body)).json()

    by_reference = await provider.get("/refunds", params={"reference": body["reference"]})
    by_charge = await provider.get("/refunds", params={"charge_id": charge["id"]})
    nothing = await provider.get("/refunds", params={"reference": str(uuid.uuid4())})
    unsaid = await provider.get("/refunds")

    assert (await by_reference.json())["data"] == [created]
    assert (await by_charge.json())["data"] == [created]
    assert (await nothing.json())["data"] == []
    assert unsaid.status == 400
    assert (await provider.get("/refunds/re_nope")).status == 404


async def test_a_declined_refund_fails_and_frees_its_amount(
    make_settings: MakeSettings, db: Database
) -> None:
    async with running(make_settings(provider_refund_decline_rate=1.0)) as client:
        charge = await succeeded_charge(client, amount_minor=1000)
        refund = await (await post_refund(client, refund_body(charge, amount_minor=1000))).json()

        async def final() -> dict[str, Any] | None:
            answer = await (await client.get(f"/refunds/{refund['id']}")).json()
            return None if answer["status"] == "processing" else answer

        done = await eventually(final, within=10)
        assert (done["status"], done["failure_reason"]) == ("failed", "refund_declined")
        [delivery] = await db.fetch(
            "SELECT event_type FROM provider.webhook_deliveries WHERE refund_id = $1",
            refund["id"],
        )
        assert delivery["event_type"] == "refund.failed"
        # A failed refund gives nothing back, so the whole amount can be asked again.
        again = await post_refund(client, refund_body(charge, amount_minor=1000))
        assert again.status == 201


async def test_an_outage_answers_503_and_stores_nothing(
    make_settings: MakeSettings, db: Database
) -> None:
    async with running(make_settings(provider_error_rate=1.0)) as client:
        body = {"charge_id": "ch_x", "reference": "r", "amount_minor": 1, "currency": "USD"}
        response = await post_refund(client, body)
        assert response.status == 503
    assert await refund_rows(db) == []


async def test_settlement_takes_only_due_refunds(provider: Client, db: Database) -> None:
    charge = await succeeded_charge(provider)
    refund = await (await post_refund(provider, refund_body(charge))).json()
    # Nothing more is due once the background loop took it.
    await eventually(lambda: _settled(db), within=10)
    assert await settle_due(db, Simulation(0, 0.0, 0.0, 0.0, 0.0)) == 0
    [row] = await refund_rows(db)
    assert (row["id"], row["status"]) == (refund["id"], "succeeded")


async def _settled(db: Database) -> bool:
    rows = await refund_rows(db)
    return bool(rows) and all(r["status"] != "processing" for r in rows)
