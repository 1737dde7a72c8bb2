"""Parked messages: listed with their reason, replayed to success, purged."""

from __future__ import annotations

import uuid

import pytest

from libs.common.broker.connection import Broker
from libs.common.broker.consumer import Consumer
from libs.common.broker.parking import ParkingLot
from libs.common.broker.topology import Topology
from libs.common.messages import Envelope, PaymentRequested
from tests.integration.test_broker import payment_requested, queue_depth
from tests.support import eventually


class Switchable:
    """Fails every message until told to succeed, like a bug fixed by a deploy."""

    def __init__(self) -> None:
        self.failing = True
        self.succeeded: list[uuid.UUID] = []

    async def __call__(self, envelope: Envelope[PaymentRequested]) -> None:
        if self.failing:
            raise RuntimeError("bug: cannot handle this yet")
        self.succeeded.append(envelope.message_id)


async def park(broker: Broker, topology: Topology, handler: Switchable, count: int) -> list[str]:
    consumer = Consumer(
        broker, topology.payment_requested, PaymentRequested, handler, retry_backoff_seconds=0.01
    )
    await consumer.start()
    ids = []
    try:
        for _ in range(count):
            envelope = payment_requested()
            ids.append(str(envelope.message_id))
            await broker.publish(envelope)
        parking = topology.payment_requested.parking
        await eventually(lambda: _depth_is(broker, parking, count))
    finally:
        await consumer.stop(grace_seconds=5)
    return ids


async def _depth_is(broker: Broker, queue: str, count: int) -> bool:
    return await queue_depth(broker, queue) == count


async def test_browse_lists_reasons_and_leaves_the_queue_as_it_was(
    broker: Broker, topology: Topology
) -> None:
    ids = await park(broker, topology, Switchable(), 3)
    lot = ParkingLot(broker)
    queue = lot.queue("payment-requested")

    parked = await lot.browse(queue)

    assert [p.message_id for p in parked] == ids
    assert {p.reason for p in parked} == {"retries_exhausted"}
    assert all("cannot handle this yet" in (p.error or "") for p in parked)
    assert all(p.routing_key == "payment.requested" for p in parked)
    assert all(p.attempts == topology.delivery_limit for p in parked)
    assert await queue_depth(broker, queue.parking) == 3
    shown = await lot.show(queue, ids[1])
    assert shown is not None
    assert shown.message_id == ids[1]
    assert await lot.show(queue, "no-such-id") is None
    assert await queue_depth(broker, queue.parking) == 3


async def test_replay_after_the_fix_succeeds_and_purge_removes(
    broker: Broker, topology: Topology
) -> None:
    handler = Switchable()
    ids = await park(broker, topology, handler, 3)
    lot = ParkingLot(broker)
    queue = lot.queue(topology.payment_requested.name)
    handler.failing = False
    consumer = Consumer(broker, queue, PaymentRequested, handler, retry_backoff_seconds=0.01)
    await consumer.start()
    try:
        assert await lot.replay(queue, ids[0]) == 1
        await eventually(lambda: len(handler.succeeded) == 1)
        assert [str(i) for i in handler.succeeded] == [ids[0]]
        assert await queue_depth(broker, queue.parking) == 2

        assert await lot.purge(queue, ids[1]) == 1
        assert [p.message_id for p in await lot.browse(queue)] == [ids[2]]
        assert await lot.purge(queue) == 1
        assert await queue_depth(broker, queue.parking) == 0
        # Nothing else reaches the handler: the queue is empty and nothing is in flight.
        await eventually(consumer.settled)
    finally:
        await consumer.stop(grace_seconds=5)
    assert len(handler.succeeded) == 1


async def test_message_parked_by_the_broker_is_replayed_to_its_queue(
    broker: Broker, topology: Topology
) -> None:
    await broker.publish(payment_requested())
    for _ in range(topology.delivery_limit + 1):
        async with broker.connection.channel() as channel:
            queue = await channel.get_queue(topology.payment_requested.name)
            await queue.get(timeout=5, fail=False)
    lot = ParkingLot(broker)
    spec = topology.payment_requested
    await eventually(lambda: _depth_is(broker, spec.parking, 1))

    [parked] = await lot.browse(spec)
    assert parked.reason == "delivery_limit"
    assert parked.routing_key == "payment.requested"

    assert await lot.replay(spec) == 1
    assert await queue_depth(broker, spec.name) == 1
    async with broker.connection.channel() as channel:
        queue = await channel.get_queue(spec.name)
        message = await queue.get(timeout=5)
        assert message is not None
        assert message.headers["x-replayed"] == 1
        assert "x-death" not in message.headers
        await message.ack()


async def test_unknown_queue_names_the_known_ones(broker: Broker) -> None:
    with pytest.raises(LookupError, match="payment-requested"):
        ParkingLot(broker).queue("nope")
