"""The webhooks service killed mid-stream: every event stored once and applied once.

1,000 webhook.received messages are in flight when the service gets SIGKILL (no
graceful shutdown: some transactions were never committed, some were committed but
their messages never acked). A new process takes over; RabbitMQ redelivers whatever was
unacked, and the inbox and the event store must absorb it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.common.broker.publisher import to_amqp
from libs.common.broker.topology import Topology, declare
from libs.common.messages import WebhookReceived, wrap
from libs.common.signing import seed_signature
from libs.common.state_machine import NewPayment, create_payments
from libs.common.states import TransitionSource
from tests.e2e.stack import Stack
from tests.support import eventually, messages_consumed

pytestmark = pytest.mark.e2e

log = logging.getLogger(__name__)

EVENTS = 1000
RESENT = 50
SECRET = "webhook-secret-key"
TOPOLOGY = Topology()  # what the services use


@pytest.fixture
async def channel(rabbitmq_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A publisher-confirm channel on the test's vhost, with the services' topology."""
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, TOPOLOGY)
        yield channel


async def add_payments(db: asyncpg.Connection[Any], n: int) -> list[tuple[uuid.UUID, str]]:
    """`n` pending payments with their creation audit rows, in one transaction."""
    ids = [uuid.uuid4() for _ in range(n)]
    references = [f"PAY-{i.hex[:10].upper()}" for i in ids]
    await create_payments(
        db,
        [
            NewPayment(
                id=i, reference=r, amount_minor=2500, currency="USD", customer_id="crash_test"
            )
            for i, r in zip(ids, references, strict=True)
        ],
        source=TransitionSource.API,
        reason="crash test",
    )
    return list(zip(ids, references, strict=True))


def completed_webhook(index: int, payment_id: uuid.UUID, reference: str) -> bytes:
    return json.dumps(
        {
            "event_id": f"evt_crash_{index:04d}",
            "event_type": "payment.completed",
            "payment_id": str(payment_id),
            "provider": "simulated",
            "data": {"reference": reference, "provider_reference": f"ch_{payment_id.hex[:16]}"},
        }
    ).encode()


def message(raw: bytes) -> aio_pika.Message:
    """A webhook.received message as the gateway publishes it (new message id each time)."""
    now = dt.datetime.now(dt.UTC)
    envelope = wrap(
        WebhookReceived(
            raw_body=base64.b64encode(raw),
            headers={"X-Webhook-Signature": seed_signature(raw, SECRET)},
            signature_scheme="seed",
            received_at=now,
            verified_at=now,
        )
    )
    return to_amqp(envelope)


async def publish(channel: aio_pika.abc.AbstractChannel, bodies: list[bytes]) -> None:
    """Persistent, mandatory, each confirmed; in small batches, so the stream takes a while."""
    exchange = await channel.get_exchange(TOPOLOGY.exchange)
    for start in range(0, len(bodies), 25):
        await asyncio.gather(
            *(
                exchange.publish(message(raw), routing_key="webhook.received", mandatory=True)
                for raw in bodies[start : start + 25]
            )
        )


async def stored(db: asyncpg.Connection[Any]) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM webhooks.webhook_events")
    return count


async def ready_messages(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    """Messages waiting in `name`, from a passive declare (unacked ones not included)."""
    queue = await channel.declare_queue(name, passive=True)
    count = queue.declaration_result.message_count
    assert count is not None
    return count


async def test_webhooks_killed_mid_stream_store_and_apply_every_event_once(
    stack: Stack,
    db: asyncpg.Connection[Any],
    channel: aio_pika.abc.AbstractChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)  # alembic.ini leaves the root at WARNING
    payments = await add_payments(db, EVENTS)
    bodies = [completed_webhook(i, pid, ref) for i, (pid, ref) in enumerate(payments)]
    first = await stack.start("webhooks")

    publishing = asyncio.create_task(publish(channel, bodies))
    try:
        deadline = time.monotonic() + 30
        while await stored(db) < EVENTS // 10:
            assert time.monotonic() < deadline, "the webhooks service stored too little in 30s"
            assert not publishing.done() or publishing.exception() is None
            await asyncio.sleep(0.005)
        first.kill()  # SIGKILL, mid-stream
    finally:
        await publishing
    stored_at_kill = await stored(db)
    log.info("webhooks service killed with %d of %d events stored", stored_at_kill, EVENTS)
    assert 0 < stored_at_kill < EVENTS, f"the kill was not mid-stream: {stored_at_kill} stored"

    second = await stack.start("webhooks")
    await eventually(lambda: _stored_is(db, EVENTS), within=60, interval=0.1)

    context = f"(killed at {stored_at_kill} of {EVENTS} stored)"
    summary = await db.fetch(
        "SELECT status, duplicates, attempts, count(*) AS n FROM webhooks.webhook_events"
        " GROUP BY status, duplicates, attempts"
    )
    assert [tuple(r) for r in summary] == [("applied", 0, 1, EVENTS)], context
    pending: int = await db.fetchval(
        "SELECT count(*) FROM payments.payments WHERE status <> 'completed'"
    )
    assert pending == 0, context
    await assert_applied_once_each(db, [pid for pid, _ in payments], context)

    # The provider resends some of them (same bytes, new messages): duplicates, nothing more.
    resent = bodies[::20][:RESENT]
    assert len(resent) == RESENT
    queue = TOPOLOGY.webhook_received.name
    consumed = await messages_consumed(second.url, queue)
    await publish(channel, resent)
    await eventually(lambda: _duplicates_are(db, RESENT), within=30, interval=0.1)

    # Drained: the service is done with every resend (whatever else it would do with one).
    async def resends_done() -> bool:
        return await messages_consumed(second.url, queue) >= consumed + RESENT

    await eventually(resends_done, within=30, interval=0.1)

    duplicated = await db.fetch("SELECT raw_body FROM webhooks.webhook_events WHERE duplicates = 1")
    assert sorted(r["raw_body"] for r in duplicated) == sorted(resent)
    assert await _duplicates_are(db, RESENT)
    assert await stored(db) == EVENTS
    await assert_applied_once_each(db, [pid for pid, _ in payments], context)

    assert await ready_messages(channel, TOPOLOGY.webhook_received.name) == 0
    assert await ready_messages(channel, TOPOLOGY.webhook_received.parking) == 0
    outcomes = await webhook_outcomes(second.url)
    assert outcomes.get("duplicate") == RESENT, outcomes
    # Nothing left unacked either: once the consumer is gone, the queue is still empty.
    second.terminate()
    assert await second.wait_exit(within=15) == 0
    assert await ready_messages(channel, TOPOLOGY.webhook_received.name) == 0
    log.info(
        "all %d events stored and applied once after the kill at %d; the new process saw %s",
        EVENTS,
        stored_at_kill,
        outcomes,
    )


async def webhook_outcomes(url: str) -> dict[str, int]:
    """The service's webhook_events_total by outcome (redelivered: committed, never acked)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        sample.labels["outcome"]: int(sample.value)
        for family in text_string_to_metric_families(text)
        if family.name == "webhook_events"
        for sample in family.samples
        if sample.name == "webhook_events_total"
    }


async def _stored_is(db: asyncpg.Connection[Any], n: int) -> bool:
    return await stored(db) == n


async def _duplicates_are(db: asyncpg.Connection[Any], n: int) -> bool:
    total: int = await db.fetchval("SELECT sum(duplicates) FROM webhooks.webhook_events")
    return total == n


async def assert_applied_once_each(
    db: asyncpg.Connection[Any], payment_ids: list[uuid.UUID], context: str
) -> None:
    """One webhook audit row per payment, applied (pending to completed), nothing refused."""
    rows = await db.fetch(
        "SELECT payment_id, count(*) AS n, bool_and(applied) AS applied,"
        " min(from_status) AS from_status, min(to_status) AS to_status"
        " FROM payments.payment_events WHERE source = 'webhook' GROUP BY payment_id"
    )
    assert len(rows) == len(payment_ids), context
    assert {r["payment_id"] for r in rows} == set(payment_ids), context
    wrong = [dict(r) for r in rows if (r["n"], r["applied"]) != (1, True)]
    assert wrong == [], context
    assert {(r["from_status"], r["to_status"]) for r in rows} == {("pending", "completed")}
