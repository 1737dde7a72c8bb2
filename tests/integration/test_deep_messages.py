"""Deeply nested JSON on the bus: parked with its reason, never a crashed or looping consumer."""

from __future__ import annotations

import aio_pika
import pytest

from libs.common.broker.connection import Broker
from libs.common.broker.consumer import Consumer
from libs.common.broker.topology import Topology
from libs.common.db import Database
from libs.common.messages import WebhookReceived
from services.webhooks.handling import WebhookIntake
from tests.integration.test_broker import Recorder, consume, get_one, queue_depth
from tests.integration.test_webhooks_service import events, received
from tests.support import eventually


def nested_list(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [1000, 100_000])
async def test_deeply_nested_message_is_parked_as_undecodable(
    broker: Broker, topology: Topology, depth: int
) -> None:
    handler = Recorder()
    consumer = await consume(broker, handler)
    body = b'{"message_id": "x", "payload": ' + nested_list(depth) + b"}"
    try:
        await broker.publisher.publish_message(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            exchange=topology.exchange,
            routing_key="payment.requested",
        )
        await eventually(lambda: queue_depth(broker, topology.payment_requested.parking))
    finally:
        await consumer.stop(grace_seconds=5)
    assert handler.calls == []
    parked = await get_one(broker, topology.payment_requested.parking)
    assert parked.headers["x-parked-reason"] == "undecodable"
    assert await queue_depth(broker, topology.payment_requested.name) == 0


async def test_webhook_whose_body_nests_too_deep_is_parked_as_poison_at_once(
    broker: Broker, topology: Topology, db: Database
) -> None:
    """The gateway refuses such a body; one that reaches the queue anyway (an older
    gateway, a replay) is poison: parked on its first delivery with the reason, not
    retried until the delivery limit as an unexpected RecursionError would be."""
    intake = WebhookIntake(db)
    consumer = Consumer(
        broker,
        topology.webhook_received,
        WebhookReceived,
        intake.handle,
        batch_handler=intake.handle_batch,
        retry_backoff_seconds=0.01,
    )
    await consumer.start()
    raw = (
        b'{"event_type": "payment.completed", "payment_id": "p", "data": '
        + nested_list(3000)
        + b"}"
    )
    try:
        await broker.publish(received(raw))
        await eventually(lambda: queue_depth(broker, topology.webhook_received.parking))
    finally:
        await consumer.stop(grace_seconds=5)
    parked = await get_one(broker, topology.webhook_received.parking)
    assert parked.headers["x-parked-reason"] == "poison"
    assert "nests" in str(parked.headers["x-parked-error"])
    assert parked.headers["x-delivery-attempts"] == 1
    assert await events(db) == []
