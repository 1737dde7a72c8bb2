"""Refunds and cancels at the in-process gateway, against the real database and broker."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from libs.common.broker.connection import Broker
from libs.common.broker.publisher import PublishError
from libs.common.cancellation import claim_for_charging
from libs.common.db import Connection, Database
from libs.common.messages import RefundRequested, decode
from libs.common.refunds import settle_refund
from libs.common.state_machine import NewPayment, create_payments
from libs.common.states import PaymentStatus, TransitionSource
from libs.common.web import BROKER
from services.gateway.access import key_id
from tests.integration.conftest import MakeGateway
from tests.integration.gateway_client import Answer, Gateway
from tests.payments_data import move_to

KEY, OTHER_KEY = "key-refunds-1a2b", "key-refunds-3c4d"
OWNER = key_id(KEY)


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> AsyncIterator[Gateway]:
    async with make_gateway(api_keys=f"{KEY},{OTHER_KEY}") as gateway:
        yield gateway


async def add_payment(
    db: Database,
    *,
    status: PaymentStatus = PaymentStatus.COMPLETED,
    amount_minor: int = 10000,
    currency: str = "USD",
    owner: str | None = OWNER,
    charge_requested: bool = False,
) -> uuid.UUID:
    payment_id = uuid.uuid4()

    async def insert(conn: Connection) -> None:
        await create_payments(
            conn,
            [
                NewPayment(
                    payment_id,
                    f"PAY-{payment_id.hex[:10].upper()}",
                    amount_minor,
                    currency,
                    "c1",
                    owner=owner,
                )
            ],
            source=TransitionSource.API,
        )
        if charge_requested:
            await claim_for_charging(conn, [payment_id])
        if status is not PaymentStatus.PENDING:
            await move_to(
                conn,
                payment_id,
                status,
                source=TransitionSource.WEBHOOK,
                provider="simulated",
                provider_reference=f"ch_{payment_id.hex[:24]}",
            )

    await db.transaction(insert)
    return payment_id


async def refund(
    gateway: Gateway,
    payment_id: uuid.UUID | str,
    body: Any = None,
    *,
    key: str = KEY,
    idempotency_key: str | None = None,
    raw: bytes | None = None,
) -> Answer:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    return await gateway.call(
        "POST", f"/api/payments/{payment_id}/refunds", data=data, headers=headers
    )


async def get(gateway: Gateway, path: str, key: str = KEY) -> Answer:
    return await gateway.call("GET", path, headers={"Authorization": f"Bearer {key}"})


async def published(broker: Broker) -> list[RefundRequested]:
    messages = []
    async with broker.connection.channel() as channel:
        queue = await channel.get_queue(broker.topology.refund_requested.name)
        while (message := await queue.get(fail=False)) is not None:
            messages.append(decode(message.body, RefundRequested).payload)
            await message.ack()
    return messages


async def refunds_stored(db: Database) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch("SELECT * FROM payments.refunds ORDER BY created_at")]


async def scalar(db: Database, sql: str, *args: Any) -> Any:
    row = await db.fetchrow(sql, *args)
    assert row is not None
    return row[0]


async def status_of(db: Database, payment_id: uuid.UUID) -> str:
    status: str = await scalar(db, "SELECT status FROM payments.payments WHERE id = $1", payment_id)
    return status


# --- accepted ---------------------------------------------------------------------------------


async def test_a_partial_refund_is_stored_pending_and_published(
    gateway: Gateway, db: Database, broker: Broker
) -> None:
    payment_id = await add_payment(db)

    answer = await refund(gateway, payment_id, {"amount": "25.50", "reason": "paid twice"})

    assert answer.status == 202, answer.body
    body = answer.body
    assert (body["amount"], body["currency"], body["status"]) == ("25.50", "USD", "pending")
    assert body["reason"] == "paid twice"
    assert body["payment_id"] == str(payment_id)
    assert answer.headers["Location"] == f"/api/refunds/{body['id']}"
    [message] = await published(broker)
    assert (str(message.refund_id), message.payment_id) == (body["id"], payment_id)
    [row] = await refunds_stored(db)
    assert (row["amount_minor"], row["status"]) == (2550, "pending")

    one = await get(gateway, f"/api/refunds/{body['id']}")
    assert (one.status, one.body) == (200, body)
    page = await get(gateway, f"/api/payments/{payment_id}/refunds")
    assert page.body == {"data": [body]}


async def test_without_an_amount_what_is_left_is_refunded(gateway: Gateway, db: Database) -> None:
    payment_id = await add_payment(db, amount_minor=10000)
    first = await refund(gateway, payment_id, {"amount": 30})
    rest = await refund(gateway, payment_id)

    assert (first.status, rest.status) == (202, 202)
    assert rest.body["amount"] == "70.00"
    nothing = await refund(gateway, payment_id, {})
    assert (nothing.status, nothing.body["error"]) == (409, "nothing_to_refund")


async def test_a_jpy_payment_is_refunded_in_whole_yen(gateway: Gateway, db: Database) -> None:
    payment_id = await add_payment(db, amount_minor=5000, currency="JPY")
    answer = await refund(gateway, payment_id, {"amount": "1200", "currency": "JPY"})
    assert (answer.status, answer.body["amount"]) == (202, "1200")


async def test_the_same_idempotency_key_replays_the_same_refund(
    gateway: Gateway, db: Database, broker: Broker
) -> None:
    payment_id = await add_payment(db)
    first = await refund(gateway, payment_id, {"amount": "10.00"}, idempotency_key="r-1")
    again = await refund(gateway, payment_id, {"amount": "10"}, idempotency_key="r-1")
    other = await refund(gateway, payment_id, {"amount": "11"}, idempotency_key="r-1")

    assert (first.status, again.status) == (202, 202)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.body == first.body
    assert (other.status, other.body["error"]) == (422, "idempotency_key_reused")
    assert len(await refunds_stored(db)) == 1
    assert len(await published(broker)) == 1


async def test_concurrent_refunds_never_exceed_the_payment(gateway: Gateway, db: Database) -> None:
    payment_id = await add_payment(db, amount_minor=1000)
    # 30 refunds of 1.50 against 10.00, all at once, each with its own key: six fit.
    answers = await asyncio.gather(
        *(
            refund(gateway, payment_id, {"amount": "1.50"}, idempotency_key=f"c-{i}")
            for i in range(30)
        )
    )
    assert sorted(a.status for a in answers) == [202] * 6 + [422] * 24
    assert {a.body["error"] for a in answers if a.status == 422} == {"amount_exceeds_refundable"}
    rows = await refunds_stored(db)
    assert sum(r["amount_minor"] for r in rows) == 900
    # The refused ones kept nothing, their keys included.
    keys = await scalar(db, "SELECT count(*) FROM gateway.idempotency_keys")
    assert keys == 6
    # What is left, 1.00, is refunded by asking for it in full; then nothing is left.
    rest = await refund(gateway, payment_id)
    assert (rest.status, rest.body["amount"]) == (202, "1.00")
    none_left = await refund(gateway, payment_id, {"amount": "0.01"})
    assert (none_left.status, none_left.body["error"]) == (409, "nothing_to_refund")


async def test_a_broker_that_does_not_confirm_leaves_no_refund(
    gateway: Gateway, db: Database
) -> None:
    payment_id = await add_payment(db)

    async def refuse(_: object) -> None:
        raise PublishError("not confirmed (test)")

    broker = gateway.app[BROKER]
    original = broker.publish
    broker.publish = refuse  # type: ignore[method-assign]
    try:
        answer = await refund(gateway, payment_id, {"amount": "5"}, idempotency_key="b-1")
    finally:
        broker.publish = original  # type: ignore[method-assign]

    assert (answer.status, answer.body["error"]) == (503, "broker_unavailable")
    assert answer.headers["Retry-After"]
    assert await refunds_stored(db) == []
    retried = await refund(gateway, payment_id, {"amount": "5"}, idempotency_key="b-1")
    assert retried.status == 202
    assert len(await refunds_stored(db)) == 1


# --- refused, nothing stored ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"amount": "-5.00"}, 422, "invalid_amount"),
        ({"amount": -5}, 422, "invalid_amount"),
        ({"amount": "0"}, 422, "invalid_amount"),
        ({"amount": 0.0}, 422, "invalid_amount"),
        ({"amount": "1.005"}, 422, "amount_too_precise"),
        ({"amount": "100.01"}, 422, "amount_exceeds_refundable"),
        ({"amount": "1e12"}, 422, "amount_too_large"),
        ({"amount": "ten"}, 422, "invalid_amount"),
        ({"amount": True}, 422, "invalid_amount"),
        ({"amount": "NaN"}, 422, "invalid_amount"),
        ({"amount": "1.00", "currency": "EUR"}, 422, "currency_mismatch"),
        ({"amount": "1.00", "currency": "XYZ"}, 422, "invalid_currency"),
        ({"amount": "1.00", "tip": "1"}, 422, "unknown_field"),
        ({"reason": ""}, 422, "invalid_reason"),
        ({"reason": "x" * 501}, 422, "invalid_reason"),
        ([1, 2], 400, "invalid_body"),
    ],
)
async def test_hostile_bodies_are_refused_and_store_nothing(
    gateway: Gateway, db: Database, broker: Broker, body: Any, status: int, code: str
) -> None:
    payment_id = await add_payment(db, amount_minor=10000)
    answer = await refund(gateway, payment_id, body, idempotency_key="hostile")
    assert (answer.status, answer.body["error"]) == (status, code), answer.body
    assert answer.body["message"]
    assert await refunds_stored(db) == []
    assert await published(broker) == []
    assert await scalar(db, "SELECT count(*) FROM gateway.idempotency_keys") == 0


async def test_wrong_currency_digits_are_refused(gateway: Gateway, db: Database) -> None:
    payment_id = await add_payment(db, amount_minor=5000, currency="JPY")
    answer = await refund(gateway, payment_id, {"amount": "10.5"})
    assert (answer.status, answer.body["error"]) == (422, "amount_too_precise")
    bhd = await add_payment(db, amount_minor=5000, currency="BHD")
    assert (await refund(gateway, bhd, {"amount": "1.0005"})).body["error"] == "amount_too_precise"
    assert (await refund(gateway, bhd, {"amount": "1.005"})).status == 202


async def test_unknown_malformed_and_other_keys_payments_are_not_found(
    gateway: Gateway, db: Database
) -> None:
    theirs = await add_payment(db, owner=key_id(OTHER_KEY))
    unknown = await refund(gateway, uuid.uuid4(), {"amount": "1"})
    other = await refund(gateway, theirs, {"amount": "1"})
    malformed = await refund(gateway, "not-a-uuid", {"amount": "1"})

    assert (unknown.status, unknown.body["error"]) == (404, "payment_not_found")
    assert (other.status, other.body["error"]) == (404, "payment_not_found")
    assert (malformed.status, malformed.body["error"]) == (400, "invalid_payment_id")
    assert await refunds_stored(db) == []
    # Their key sees its own payment; ours sees neither its refunds nor the payment's.
    assert (await refund(gateway, theirs, {"amount": "1"}, key=OTHER_KEY)).status == 202
    [row] = await refunds_stored(db)
    assert (await get(gateway, f"/api/refunds/{row['id']}")).status == 404
    assert (await get(gateway, f"/api/payments/{theirs}/refunds")).status == 404
    assert (await get(gateway, f"/api/refunds/{row['id']}", key=OTHER_KEY)).status == 200
    assert (await get(gateway, "/api/refunds/nope")).body["error"] == "invalid_refund_id"


@pytest.mark.parametrize(
    "status",
    [PaymentStatus.PENDING, PaymentStatus.PROCESSING, PaymentStatus.FAILED, PaymentStatus.REFUNDED],
)
async def test_only_completed_payments_are_refunded(
    gateway: Gateway, db: Database, status: PaymentStatus
) -> None:
    payment_id = await add_payment(db, status=status)
    answer = await refund(gateway, payment_id, {"amount": "1"})
    assert (answer.status, answer.body["error"]) == (409, "payment_not_refundable")
    assert status.value in answer.body["message"]
    assert answer.body["details"][0]["code"] == status.value
    assert await refunds_stored(db) == []


async def test_refunds_need_an_api_key(gateway: Gateway, db: Database) -> None:
    payment_id = await add_payment(db)
    answer = await gateway.call("POST", f"/api/payments/{payment_id}/refunds", data=b"")
    assert (answer.status, answer.body["error"]) == (401, "api_key_missing")
    assert (await gateway.call("GET", f"/api/refunds/{uuid.uuid4()}")).status == 401


# --- settling moves the payment ---------------------------------------------------------------


async def test_succeeded_refunds_move_the_payment_partially_then_fully(
    gateway: Gateway, db: Database
) -> None:
    payment_id = await add_payment(db, amount_minor=10000)
    ids = [
        uuid.UUID((await refund(gateway, payment_id, {"amount": amount})).body["id"])
        for amount in ("30", "20", "50")
    ]

    async def settle(refund_id: uuid.UUID, succeeded: bool = True) -> None:
        await db.transaction(
            lambda conn: settle_refund(
                conn, refund_id, succeeded=succeeded, source=TransitionSource.WEBHOOK, reason="t"
            )
        )

    await settle(ids[0])
    assert await status_of(db, payment_id) == "partially_refunded"
    await settle(ids[0])  # a duplicate changes nothing
    await settle(ids[1], succeeded=False)
    assert await status_of(db, payment_id) == "partially_refunded"
    # The failed refund's 20.00 can be asked again.
    again = await refund(gateway, payment_id, {"amount": "20"})
    assert again.status == 202
    await settle(ids[2])
    assert await status_of(db, payment_id) == "partially_refunded"
    await settle(uuid.UUID(again.body["id"]))
    assert await status_of(db, payment_id) == "refunded"

    payment = await get(gateway, f"/api/payments/{payment_id}")
    moves = [(e["from_status"], e["to_status"], e["applied"]) for e in payment.body["events"]]
    assert moves[-3:] == [
        ("completed", "partially_refunded", True),
        ("partially_refunded", "partially_refunded", True),
        ("partially_refunded", "refunded", True),
    ]
    stats = await get(gateway, "/api/payments/stats")
    assert stats.body["refunds"]["refunded"] == {"USD": {"count": 3, "amount": "100.00"}}
    assert stats.body["payments"]["by_status"]["refunded"]["count"] == 1


# --- cancel ---------------------------------------------------------------------------------


async def cancel(gateway: Gateway, payment_id: uuid.UUID | str, key: str = KEY) -> Answer:
    return await gateway.call(
        "POST", f"/api/payments/{payment_id}/cancel", headers={"Authorization": f"Bearer {key}"}
    )


async def test_a_pending_payment_not_yet_charged_is_canceled(
    gateway: Gateway, db: Database
) -> None:
    payment_id = await add_payment(db, status=PaymentStatus.PENDING)
    answer = await cancel(gateway, payment_id)
    assert (answer.status, answer.body["status"]) == (200, "canceled")
    assert answer.body["events"][-1]["to_status"] == "canceled"
    assert answer.body["events"][-1]["source"] == "api"
    again = await cancel(gateway, payment_id)
    assert (again.status, again.body["status"]) == (200, "canceled")
    assert len(again.body["events"]) == len(answer.body["events"])


async def test_a_cancel_is_refused_once_charging_began(gateway: Gateway, db: Database) -> None:
    claimed = await add_payment(db, status=PaymentStatus.PENDING, charge_requested=True)
    processing = await add_payment(db, status=PaymentStatus.PROCESSING)
    for payment_id, status in ((claimed, "pending"), (processing, "processing")):
        answer = await cancel(gateway, payment_id)
        assert (answer.status, answer.body["error"]) == (409, "payment_not_cancelable")
        assert answer.body["details"][0]["code"] == status
        assert await status_of(db, payment_id) == status


async def test_a_cancel_of_an_unknown_or_other_keys_payment_is_not_found(
    gateway: Gateway, db: Database
) -> None:
    theirs = await add_payment(db, status=PaymentStatus.PENDING, owner=key_id(OTHER_KEY))
    assert (await cancel(gateway, uuid.uuid4())).status == 404
    assert (await cancel(gateway, theirs)).status == 404
    assert await status_of(db, theirs) == "pending"
    assert (await cancel(gateway, "x")).status == 400
