"""Payment intake end to end: real gateway, payments and provider processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest

from libs.common.broker.publisher import to_amqp
from libs.common.broker.topology import Topology
from libs.common.messages import PaymentRequested, wrap
from tests.e2e.stack import Stack
from tests.support import eventually, messages_consumed, rabbitmqctl
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

SEED_REQUEST = {
    "amount": 100.00,
    "customer_id": "test_customer",
    "description": "Test payment from DevOps",
}
# Charges stay `processing` for the whole test: no webhook interferes.
SLOW_SETTLEMENT = {"PROVIDER_WEBHOOK_DELAY_MS": "600000", "PROVIDER_DECLINE_RATE": "0"}


async def charges_for(db: asyncpg.Connection[Any], payment_id: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM provider.charges WHERE payment_id = $1", uuid.UUID(payment_id)
    )
    return count


async def status_of(db: asyncpg.Connection[Any], payment_id: str) -> str | None:
    status: str | None = await db.fetchval(
        "SELECT status FROM payments.payments WHERE id = $1", uuid.UUID(payment_id)
    )
    return status


async def pay(http: aiohttp.ClientSession, base: str, body: Any = SEED_REQUEST) -> tuple[int, Any]:
    async with http.post(f"{base}/api/payments/pay", json=body) as response:
        return response.status, await response.json()


async def test_seed_request_is_stored_and_charged_once(stack: Stack, db: Any) -> None:
    await stack.start("provider", **SLOW_SETTLEMENT)
    await stack.start("payments")
    gateway = await stack.start("gateway")

    async with aiohttp.ClientSession() as http:
        status, body = await pay(http, gateway.url)
        assert status == 202
        assert body["status"] == "pending"
        assert body["reference"].startswith("PAY-")
        accepted_at = time.monotonic()

        async def visible() -> bool:
            async with http.get(f"{gateway.url}/api/payments/{body['id']}") as response:
                return response.status == 200

        await eventually(visible, within=1.0, interval=0.02)
        assert time.monotonic() - accepted_at < 1.0

        await eventually(lambda: _is(db, body["id"], "processing"), within=10)
        async with http.get(f"{gateway.url}/api/payments/{body['id']}") as response:
            payment = await response.json()
    assert payment["status"] == "processing"
    assert payment["provider"] == "simulated"
    assert payment["provider_reference"].startswith("ch_")
    assert payment["amount"] == "100.00"
    assert await charges_for(db, body["id"]) == 1


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


async def _is(db: Any, payment_id: str, status: str) -> bool:
    return await status_of(db, payment_id) == status


def _requested(payment_id: uuid.UUID) -> Any:
    return wrap(
        PaymentRequested(
            payment_id=payment_id,
            reference=f"PAY-{payment_id.hex[:10].upper()}",
            amount_minor=2500,
            currency="EUR",
            customer_id="twice",
            requested_at=dt.datetime.now(dt.UTC),
        )
    )


async def publish_raw(rabbitmq_url: str, *messages: aio_pika.Message) -> None:
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(Topology().exchange)
        await asyncio.gather(
            *(exchange.publish(m, routing_key="payment.requested") for m in messages)
        )


async def test_message_delivered_twice_charges_once(stack: Stack, db: Any) -> None:
    await stack.start("provider", **SLOW_SETTLEMENT)
    payments = await stack.start("payments")
    payment_id = uuid.uuid4()
    envelope = _requested(payment_id)

    # The same message twice at once: both copies may reach the provider concurrently.
    await publish_raw(stack.rabbitmq_url, to_amqp(envelope), to_amqp(envelope))

    await eventually(lambda: _is(db, str(payment_id), "processing"), within=10)
    # Drained: the service is done with both copies (whatever the second one did).
    queue = Topology().payment_requested.name
    await eventually(lambda: _at_least(messages_consumed(payments.url, queue), 2), within=10)
    assert await charges_for(db, str(payment_id)) == 1
    created = await db.fetchval(
        "SELECT count(*) FROM payments.payment_events"
        " WHERE payment_id = $1 AND from_status IS NULL",
        payment_id,
    )
    assert created == 1


async def test_payments_killed_between_charge_and_commit_charges_once(
    stack: Stack, db: Any
) -> None:
    await stack.start("provider", **SLOW_SETTLEMENT)
    proxy = TcpProxy("127.0.0.1", stack.provider_port)
    await proxy.start()
    stack.provider_url = f"http://127.0.0.1:{proxy.port}"
    try:
        # The provider gets the charge request; its answer never reaches the service.
        proxy.hold_responses()
        payments = await stack.start("payments", PROVIDER_TIMEOUT_SECONDS="30")
        payment_id = uuid.uuid4()
        await publish_raw(stack.rabbitmq_url, to_amqp(_requested(payment_id)))

        await eventually(lambda: charges_for(db, str(payment_id)), within=10)
        payments.kill()  # SIGKILL: the charge exists, the commit never happened
        assert await status_of(db, str(payment_id)) == "pending"

        proxy.restore()
        await stack.start("payments")
        await eventually(lambda: _is(db, str(payment_id), "processing"), within=15)
    finally:
        await proxy.close()
    assert await charges_for(db, str(payment_id)) == 1


@pytest.fixture
def rabbitmq_restarted_afterwards() -> Iterator[None]:
    yield
    rabbitmqctl("start_app")


async def test_gateway_refuses_while_rabbitmq_is_stopped_and_recovers_by_itself(
    stack: Stack, db: Any, rabbitmq_restarted_afterwards: None
) -> None:
    await stack.start("provider", **SLOW_SETTLEMENT)
    await stack.start("payments")
    gateway = await stack.start("gateway")

    async with aiohttp.ClientSession() as http:
        rabbitmqctl("stop_app")

        started = time.monotonic()
        status, body = await pay(http, gateway.url)
        assert time.monotonic() - started < 2
        assert status == 503
        assert body["error"] == "broker_unavailable"
        async with http.get(f"{gateway.url}/ready") as response:
            assert response.status == 503
            assert (await response.json())["checks"]["database"] == "ok"

        rabbitmqctl("start_app")

        async def accepted() -> str | None:
            status, body = await pay(http, gateway.url)
            return body["id"] if status == 202 else None

        payment_id = await eventually(accepted, within=60, interval=0.5)
        # The payments service reconnected by itself too.
        await eventually(lambda: _is(db, payment_id, "processing"), within=30)
        async with http.get(f"{gateway.url}/ready") as response:
            assert response.status == 200
