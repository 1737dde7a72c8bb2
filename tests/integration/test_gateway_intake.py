"""POST /api/payments/pay against the real database and broker."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from libs.common.broker.connection import Broker
from libs.common.messages import PaymentRequested, decode
from libs.common.web import BROKER
from tests.integration.gateway_client import Gateway

SEED_REQUEST = {
    "amount": 100.00,
    "customer_id": "test_customer",
    "description": "Test payment from DevOps",
}


async def published(broker: Broker) -> list[PaymentRequested]:
    """Take every payment.requested message waiting in this test's queue."""
    messages = []
    async with broker.connection.channel() as channel:
        queue = await channel.get_queue(broker.topology.payment_requested.name)
        while (message := await queue.get(fail=False)) is not None:
            messages.append(decode(message.body, PaymentRequested).payload)
            await message.ack()
    return messages


async def idempotency_rows(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM gateway.idempotency_keys")
        return count
    finally:
        await conn.close()


async def test_seed_request_is_accepted_after_the_broker_confirmed_it(
    gateway: Gateway, broker: Broker
) -> None:
    answer = await gateway.pay(SEED_REQUEST)

    assert answer.status == 202
    body = answer.body
    assert body["status"] == "pending"
    assert body["amount"] == "100.00"
    assert body["currency"] == "USD"
    assert body["customer_id"] == "test_customer"
    assert body["description"] == "Test payment from DevOps"
    assert answer.headers["Location"] == f"/api/payments/{body['id']}"
    [message] = await published(broker)
    assert str(message.payment_id) == body["id"]
    assert message.reference == body["reference"]
    assert message.amount_minor == 10000
    assert message.requested_at.isoformat() == body["created_at"]


@pytest.mark.parametrize(
    ("amount", "currency", "minor", "shown"),
    [
        ("0.01", "USD", 1, "0.01"),
        ("12.5", "EUR", 1250, "12.50"),
        ("500", "JPY", 500, "500"),
        ("1.234", "BHD", 1234, "1.234"),
        ("999999999.99", "USD", 99_999_999_999, "999999999.99"),
    ],
)
async def test_amounts_are_exact_in_every_currency(
    gateway: Gateway, broker: Broker, amount: str, currency: str, minor: int, shown: str
) -> None:
    # Sent as a JSON number with exactly these digits: never through a float.
    raw = f'{{"amount": {amount}, "currency": "{currency}", "customer_id": "c1"}}'.encode()
    answer = await gateway.pay(raw=raw)
    assert answer.status == 202, answer.body
    assert answer.body["amount"] == shown
    [message] = await published(broker)
    assert message.amount_minor == minor


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


GOOD = {"amount": 10, "customer_id": "c1"}
BAD_REQUESTS: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("malformed json", b'{"amount": 10,', {}, 400, "invalid_json"),
    ("not utf-8", b'{"amount": 10, "customer_id": "\xff"}', {}, 400, "invalid_encoding"),
    ("array body", b"[1, 2]", {}, 400, "invalid_body"),
    ("string body", b'"pay me"', {}, 400, "invalid_body"),
    ("empty body", b"", {}, 400, "invalid_json"),
    ("duplicate key", b'{"amount": 1, "amount": 2, "customer_id": "c"}', {}, 400, "invalid_json"),
    ("NaN", b'{"amount": NaN, "customer_id": "c"}', {}, 400, "invalid_json"),
    (
        "wrong content type",
        _json(GOOD),
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    (
        "form content type",
        b"amount=10",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
    ("too large", _json({**GOOD, "description": "x" * 70_000}), {}, 413, "payload_too_large"),
    ("unknown field", _json({**GOOD, "amount_minor": 5}), {}, 422, "unknown_field"),
    ("missing amount", _json({"customer_id": "c"}), {}, 422, "missing_field"),
    ("missing customer", _json({"amount": 10}), {}, 422, "missing_field"),
    ("zero amount", _json({**GOOD, "amount": 0}), {}, 422, "invalid_amount"),
    ("negative amount", _json({**GOOD, "amount": -5}), {}, 422, "invalid_amount"),
    ("boolean amount", _json({**GOOD, "amount": True}), {}, 422, "invalid_amount"),
    ("word amount", _json({**GOOD, "amount": "ten"}), {}, 422, "invalid_amount"),
    ("too precise USD", b'{"amount": 10.001, "customer_id": "c"}', {}, 422, "amount_too_precise"),
    (
        "decimals in JPY",
        b'{"amount": 10.5, "currency": "JPY", "customer_id": "c"}',
        {},
        422,
        "amount_too_precise",
    ),
    (
        "too large amount",
        b'{"amount": 1000000000.00, "customer_id": "c"}',
        {},
        422,
        "amount_too_large",
    ),
    ("unknown currency", _json({**GOOD, "currency": "ABC"}), {}, 422, "invalid_currency"),
    ("lowercase currency", _json({**GOOD, "currency": "usd"}), {}, 422, "invalid_currency"),
    ("gold is not money", _json({**GOOD, "currency": "XAU"}), {}, 422, "invalid_currency"),
    ("numeric customer", _json({**GOOD, "customer_id": 42}), {}, 422, "invalid_customer_id"),
    ("empty customer", _json({**GOOD, "customer_id": ""}), {}, 422, "invalid_customer_id"),
    ("long customer", _json({**GOOD, "customer_id": "c" * 129}), {}, 422, "invalid_customer_id"),
    ("control chars", _json({**GOOD, "customer_id": "a\u0000b"}), {}, 422, "invalid_customer_id"),
    ("metadata not object", _json({**GOOD, "metadata": [1]}), {}, 422, "invalid_metadata"),
    (
        "metadata too big",
        _json({**GOOD, "metadata": {f"k{i}": "v" for i in range(21)}}),
        {},
        422,
        "invalid_metadata",
    ),
    (
        "bad idempotency key",
        _json(GOOD),
        {"Idempotency-Key": "has space"},
        400,
        "idempotency_key_invalid",
    ),
]


@pytest.mark.parametrize(
    ("raw", "headers", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_request_is_refused_and_leaves_nothing_behind(
    gateway: Gateway,
    broker: Broker,
    database_url: str,
    raw: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    answer = await gateway.pay(raw=raw, headers={"Idempotency-Key": "k-1", **headers})
    assert answer.status == status, answer.body
    assert answer.body["error"] == code
    assert answer.body["message"]
    assert await published(broker) == []
    assert await idempotency_rows(database_url) == 0


async def test_same_key_and_body_replays_the_first_answer(gateway: Gateway, broker: Broker) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = await gateway.pay(SEED_REQUEST, headers=key)
    # The same request with other whitespace and an equal amount is the same request.
    again = await gateway.pay(
        raw=b'{"customer_id":"test_customer","amount":100.0,'
        b'"description":"Test payment from DevOps"}',
        headers=key,
    )
    assert first.status == again.status == 202
    assert again.body == first.body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(await published(broker)) == 1


async def test_same_key_with_another_body_is_refused(gateway: Gateway, broker: Broker) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    assert (await gateway.pay(SEED_REQUEST, headers=key)).status == 202
    other = await gateway.pay({**SEED_REQUEST, "amount": 100.01}, headers=key)
    assert other.status == 422
    assert other.body["error"] == "idempotency_key_reused"
    assert len(await published(broker)) == 1


async def test_fifty_concurrent_requests_with_one_key_make_one_payment(
    gateway: Gateway, broker: Broker
) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    answers = await asyncio.gather(*(gateway.pay(SEED_REQUEST, headers=key) for _ in range(50)))

    statuses = [a.status for a in answers]
    assert set(statuses) <= {202, 409}, statuses
    accepted = [a for a in answers if a.status == 202]
    assert len({a.body["id"] for a in accepted}) == 1
    assert all(a.body["error"] == "idempotency_key_in_flight" for a in answers if a.status == 409)
    assert all(a.headers["Retry-After"] for a in answers if a.status == 409)
    assert len(await published(broker)) == 1
    # Once the first finished, the key answers with the stored response.
    replay = await gateway.pay(SEED_REQUEST, headers=key)
    assert replay.status == 202
    assert replay.body["id"] == accepted[0].body["id"]


async def test_a_retry_after_the_holder_died_publishes_the_same_payment(
    gateway: Gateway, broker: Broker, database_url: str
) -> None:
    """The gateway died after publishing but before recording the answer."""
    key = f"order-{uuid.uuid4()}"
    first = await gateway.pay(SEED_REQUEST, headers={"Idempotency-Key": key})
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE gateway.idempotency_keys SET state = 'in_flight', response_status = NULL,"
            " locked_until = now() - interval '1 second' WHERE key = $1",
            key,
        )
    finally:
        await conn.close()

    retry = await gateway.pay(SEED_REQUEST, headers={"Idempotency-Key": key})

    assert retry.status == 202
    assert retry.body == first.body
    messages = await published(broker)
    assert [str(m.payment_id) for m in messages] == [first.body["id"]] * 2


async def test_broker_gone_answers_503_at_once_and_keeps_the_key_usable(
    gateway: Gateway, broker: Broker
) -> None:
    await gateway.app[BROKER].connection.close()
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}

    started = asyncio.get_running_loop().time()
    answer = await gateway.pay(SEED_REQUEST, headers=key)
    elapsed = asyncio.get_running_loop().time() - started

    assert answer.status == 503
    assert answer.body["error"] == "broker_unavailable"
    assert answer.headers["Retry-After"] == "1"
    assert elapsed < 2
    # The key was released, not burnt: a retry is not told "in flight".
    retry = await gateway.pay(SEED_REQUEST, headers=key)
    assert retry.body["error"] == "broker_unavailable"
    assert await published(broker) == []
