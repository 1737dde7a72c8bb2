"""What several scenarios share: the run's context, waiting, seeding and publishing."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.harness import Harness, Stack
from bench.load import build_request
from libs.common.broker.publisher import to_amqp
from libs.common.broker.topology import Topology, declare
from libs.common.messages import PaymentRequested, wrap
from libs.common.provider_client import PROVIDER_NAME
from libs.common.signing import signature_headers
from libs.common.state_machine import (
    NewPayment,
    TransitionRequest,
    apply_transitions,
    create_payments,
)
from libs.common.states import PaymentStatus, TransitionSource

T = TypeVar("T")

WEBHOOK_SECRET = "webhook-secret-key"  # noqa: S105 - the development default the services use
PAY_BODY = json.dumps(
    {"amount": 100.00, "customer_id": "test_customer", "description": "Test payment from DevOps"}
).encode()
JSON = {"Content-Type": "application/json"}


@dataclass
class Context:
    harness: Harness
    quick: bool
    # Figures one scenario measured that another may reuse in the same run.
    shared: dict[str, Any] = field(default_factory=dict)

    def size(self, full: T, quick: T) -> T:
        return quick if self.quick else full


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, within: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done within {within:.0f} s")
        await asyncio.sleep(interval)


def pay_request(port: int) -> bytes:
    return build_request("POST", "/api/payments/pay", port=port, body=PAY_BODY, headers=JSON)


async def purge_queues(stack: Stack) -> None:
    """Empty every queue of the stack's vhost (between loads, so each starts alike)."""
    connection = await stack.broker()
    try:
        channel = await connection.channel()
        topology = Topology()
        await declare(channel, topology)
        for spec in topology.queues:
            queue = await channel.get_queue(spec.name, ensure=False)
            await queue.purge()
    finally:
        await connection.close()


async def publish_payments(stack: Stack, n: int, *, in_flight: int = 200) -> list[uuid.UUID]:
    """Publish `n` payment.requested messages the way the gateway does (confirmed)."""
    connection = await stack.broker()
    ids = [uuid.uuid4() for _ in range(n)]
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = Topology()
        await declare(channel, topology)
        exchange = await channel.get_exchange(topology.exchange, ensure=False)
        gate = asyncio.Semaphore(in_flight)
        now = dt.datetime.now(dt.UTC)

        async def one(payment_id: uuid.UUID) -> None:
            envelope = wrap(
                PaymentRequested(
                    payment_id=payment_id,
                    reference="PAY-" + payment_id.hex[:10].upper(),
                    amount_minor=10000,
                    currency="USD",
                    customer_id="test_customer",
                    description="Test payment from DevOps",
                    requested_at=now,
                ),
                message_id=uuid.uuid5(payment_id, "requested"),
            )
            async with gate:
                await exchange.publish(to_amqp(envelope), envelope.type, mandatory=True)

        await asyncio.gather(*(one(payment_id) for payment_id in ids))
    finally:
        await connection.close()
    return ids


async def create_sink(stack: Stack) -> None:
    """The table the minimal consumer writes one row per message into."""
    conn = await stack.connect()
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_sink"
            " (message_id uuid PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        await conn.execute("TRUNCATE bench_sink")
    finally:
        await conn.close()


async def seed_processing_payments(
    stack: Stack, n: int, *, age_seconds: float = 0.0
) -> list[tuple[uuid.UUID, str, str]]:
    """`n` payments already charged (`processing`): (id, reference, charge id) each."""
    ids = [uuid.uuid4() for _ in range(n)]
    references = ["PAY-" + i.hex[:12].upper() for i in ids]
    charges = ["ch_" + i.hex[:24] for i in ids]
    created_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_seconds)
    conn = await stack.connect()
    try:
        async with conn.transaction():
            await create_payments(
                conn,
                [
                    NewPayment(
                        id=i,
                        reference=r,
                        amount_minor=10000,
                        currency="USD",
                        customer_id="bench",
                        description="bench",
                        created_at=created_at,
                    )
                    for i, r in zip(ids, references, strict=True)
                ],
                source=TransitionSource.API,
                reason="bench seed",
            )
            await apply_transitions(
                conn,
                [
                    TransitionRequest(
                        i,
                        PaymentStatus.PROCESSING,
                        TransitionSource.PROVIDER,
                        provider=PROVIDER_NAME,
                        provider_reference=c,
                    )
                    for i, c in zip(ids, charges, strict=True)
                ],
            )
    finally:
        await conn.close()
    return list(zip(ids, references, charges, strict=True))


def signed_webhook(port: int, payment: tuple[uuid.UUID, str, str]) -> bytes:
    """The provider's `payment.completed` for `payment`, signed as the provider signs it."""
    payment_id, reference, charge_id = payment
    event_id = "evt_" + hashlib.sha256(payment_id.bytes).hexdigest()[:24]
    body = json.dumps(
        {
            "event_id": event_id,
            "event_type": "payment.completed",
            "payment_id": str(payment_id),
            "provider": "simulated",
            "data": {
                "reference": reference,
                "provider_reference": charge_id,
                "amount_minor": 10000,
                "currency": "USD",
                "status": "succeeded",
                "decline_reason": None,
            },
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        },
        separators=(",", ":"),
    ).encode()
    headers = {**JSON, **signature_headers(body, [WEBHOOK_SECRET], message_id=event_id)}
    return build_request("POST", "/api/webhooks", port=port, body=body, headers=headers)


async def count(stack: Stack, sql: str, *args: Any) -> int:
    conn = await stack.connect()
    try:
        value = await conn.fetchval(sql, *args)
    finally:
        await conn.close()
    return int(value or 0)
