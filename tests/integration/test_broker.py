"""The broker library against the real RabbitMQ: no silent loss, no loops, no double effects."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import pytest

from libs.common.broker.acks import ChannelAcks
from libs.common.broker.connection import Broker
from libs.common.broker.consumer import Consumer, PoisonMessage
from libs.common.broker.publisher import BrokerUnavailable, MessageUnroutable, to_amqp
from libs.common.broker.topology import Topology
from libs.common.db import Connection, Database
from libs.common.inbox import Inbox
from libs.common.messages import Envelope, PaymentRequested, wrap
from tests.payments_data import create_payment
from tests.support import eventually


def payment_requested(**overrides: Any) -> Envelope[PaymentRequested]:
    payment_id = uuid.uuid4()
    fields: dict[str, Any] = {
        "payment_id": payment_id,
        "reference": f"PAY-{payment_id.hex[:10]}",
        "amount_minor": 10000,
        "currency": "USD",
        "customer_id": "test_customer",
        "requested_at": dt.datetime.now(dt.UTC),
        **overrides,
    }
    return wrap(PaymentRequested(**fields))


async def queue_depth(broker: Broker, name: str) -> int:
    async with broker.connection.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        return count or 0


async def get_one(broker: Broker, name: str) -> aio_pika.abc.AbstractIncomingMessage:
    async with broker.connection.channel() as channel:
        queue = await channel.get_queue(name)
        message = await queue.get(timeout=5, fail=True)
        assert message is not None
        await message.ack()
        return message


async def test_published_message_is_routed_and_confirmed(broker: Broker) -> None:
    envelope = payment_requested()
    await broker.publish(envelope)
    message = await get_one(broker, broker.topology.payment_requested.name)
    assert message.message_id == str(envelope.message_id)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.correlation_id == envelope.correlation_id
    assert Envelope[PaymentRequested].model_validate_json(message.body) == envelope


async def test_publishing_to_an_unroutable_key_raises(broker: Broker) -> None:
    envelope = payment_requested()
    with pytest.raises(MessageUnroutable):
        await broker.publisher.publish_message(
            to_amqp(envelope), exchange=broker.topology.exchange, routing_key="nobody.listens"
        )


async def test_publishing_without_a_connection_raises_promptly(broker: Broker) -> None:
    await broker.connection.close()
    with pytest.raises(BrokerUnavailable):
        async with asyncio.timeout(3):
            await broker.publish(payment_requested())


async def test_queues_are_durable_quorum_queues_with_dead_lettering(
    broker: Broker, topology: Topology
) -> None:
    # Declaring with different arguments fails, so a passive match proves the arguments.
    async with broker.connection.channel() as channel:
        spec = topology.payment_requested
        await channel.declare_queue(
            spec.name, durable=True, arguments=topology.queue_arguments(spec)
        )
    async with broker.connection.channel() as channel:
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue(spec.name, durable=True)


class Recorder:
    """A handler that records the messages it saw and fails as told."""

    def __init__(self, failures: int = 0, exc: type[Exception] = RuntimeError) -> None:
        self.failures = failures
        self.exc = exc
        self.calls: list[uuid.UUID] = []

    async def __call__(self, envelope: Envelope[PaymentRequested]) -> None:
        self.calls.append(envelope.message_id)
        if len(self.calls) <= self.failures:
            raise self.exc("handler failed on purpose")


async def consume(broker: Broker, handler: Any) -> Consumer[PaymentRequested]:
    consumer = Consumer(
        broker,
        broker.topology.payment_requested,
        PaymentRequested,
        handler,
        retry_backoff_seconds=0.01,
    )
    await consumer.start()
    return consumer


async def test_transient_failure_is_retried_then_acked(broker: Broker) -> None:
    handler = Recorder(failures=1)
    consumer = await consume(broker, handler)
    try:
        await broker.publish(payment_requested())
        await eventually(lambda: len(handler.calls) == 2)
    finally:
        await consumer.stop(grace_seconds=5)
    assert await queue_depth(broker, broker.topology.payment_requested.name) == 0
    assert await queue_depth(broker, broker.topology.payment_requested.parking) == 0


async def test_always_failing_handler_parks_the_message_after_the_delivery_limit(
    broker: Broker, topology: Topology
) -> None:
    handler = Recorder(failures=10**6)
    consumer = await consume(broker, handler)
    envelope = payment_requested()
    try:
        await broker.publish(envelope)
        parking = topology.payment_requested.parking
        await eventually(lambda: queue_depth(broker, parking))
        # Exact: a message still looping would be ready or in flight.
        await eventually(consumer.settled)
    finally:
        await consumer.stop(grace_seconds=5)

    assert handler.calls == [envelope.message_id] * topology.delivery_limit
    assert await queue_depth(broker, topology.payment_requested.name) == 0
    parked = await get_one(broker, topology.payment_requested.parking)
    assert parked.body == to_amqp(envelope).body
    assert parked.message_id == str(envelope.message_id)
    headers = parked.headers
    assert headers["x-parked-reason"] == "retries_exhausted"
    assert "handler failed on purpose" in str(headers["x-parked-error"])
    assert headers["x-delivery-attempts"] == topology.delivery_limit
    assert headers["x-original-routing-key"] == "payment.requested"


async def test_poison_message_is_parked_at_once(broker: Broker, topology: Topology) -> None:
    handler = Recorder(failures=1, exc=PoisonMessage)
    consumer = await consume(broker, handler)
    try:
        await broker.publish(payment_requested())
        await eventually(lambda: queue_depth(broker, topology.payment_requested.parking))
    finally:
        await consumer.stop(grace_seconds=5)
    assert len(handler.calls) == 1
    parked = await get_one(broker, topology.payment_requested.parking)
    assert parked.headers["x-parked-reason"] == "poison"


async def test_undecodable_message_is_parked_without_calling_the_handler(
    broker: Broker, topology: Topology
) -> None:
    handler = Recorder()
    consumer = await consume(broker, handler)
    try:
        await broker.publisher.publish_message(
            aio_pika.Message(b"{not json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            exchange=topology.exchange,
            routing_key="payment.requested",
        )
        await eventually(lambda: queue_depth(broker, topology.payment_requested.parking))
    finally:
        await consumer.stop(grace_seconds=5)
    assert handler.calls == []
    parked = await get_one(broker, topology.payment_requested.parking)
    assert parked.body == b"{not json"
    assert parked.headers["x-parked-reason"] == "undecodable"


async def test_broker_delivery_limit_parks_messages_a_crashing_consumer_never_acks(
    broker: Broker, topology: Topology
) -> None:
    """The safety net: a consumer that dies before it can park still cannot loop forever."""
    await broker.publish(payment_requested())
    queue_name = topology.payment_requested.name
    deliveries = 0
    for _ in range(topology.delivery_limit + 1):
        # Each round takes the message and drops the channel without acking, as a crash does.
        async with broker.connection.channel() as channel:
            queue = await channel.get_queue(queue_name)
            message = await queue.get(timeout=5, fail=False)
            if message is None:
                break
            deliveries += 1
    assert deliveries == topology.delivery_limit + 1
    await eventually(lambda: queue_depth(broker, topology.payment_requested.parking))
    assert await queue_depth(broker, queue_name) == 0
    parked = await get_one(broker, topology.payment_requested.parking)
    assert parked.headers["x-first-death-reason"] == "delivery_limit"


async def test_redelivery_after_commit_changes_nothing(broker: Broker, db: Database) -> None:
    """The handler commits, then the ack is lost (here: it raises after commit)."""
    inbox = Inbox("payments", "test-consumer")
    effects: list[uuid.UUID] = []
    commits = 0

    async def handler(envelope: Envelope[PaymentRequested]) -> None:
        nonlocal commits

        async def work(conn: Connection) -> None:
            if not await inbox.claim(conn, envelope):
                return
            await create_payment(
                conn,
                envelope.payload.payment_id,
                reference=envelope.payload.reference,
                amount_minor=envelope.payload.amount_minor,
                currency=envelope.payload.currency,
                customer_id=envelope.payload.customer_id,
            )
            effects.append(envelope.payload.payment_id)

        await db.transaction(work)
        commits += 1
        if commits == 1:
            raise ConnectionResetError("connection lost before the ack")

    consumer = await consume(broker, handler)
    envelope = payment_requested()
    try:
        await broker.publish(envelope)
        await eventually(lambda: commits >= 2)
    finally:
        await consumer.stop(grace_seconds=5)

    assert effects == [envelope.payload.payment_id]
    count = await db.fetchrow(
        "SELECT count(*) AS n FROM payments.payments WHERE id = $1", envelope.payload.payment_id
    )
    assert count is not None
    assert count["n"] == 1
    assert await queue_depth(broker, broker.topology.payment_requested.name) == 0


async def test_stop_lets_in_flight_work_finish_and_ack(broker: Broker, topology: Topology) -> None:
    started = asyncio.Event()
    finished: list[uuid.UUID] = []

    async def slow(envelope: Envelope[PaymentRequested]) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(envelope.message_id)

    consumer = await consume(broker, slow)
    envelope = payment_requested()
    await broker.publish(envelope)
    await asyncio.wait_for(started.wait(), 5)
    await consumer.stop(grace_seconds=5)

    assert finished == [envelope.message_id]
    assert await queue_depth(broker, topology.payment_requested.name) == 0


class BatchRecorder:
    """A batch handler that fails every batch holding `poison` (a payment's customer id)."""

    def __init__(self, poison: str | None = None, delay: float = 0.0) -> None:
        self.batches: list[list[uuid.UUID]] = []
        self.poison = poison
        self.delay = delay

    async def __call__(self, envelopes: Sequence[Envelope[PaymentRequested]]) -> None:
        self.batches.append([e.message_id for e in envelopes])
        await asyncio.sleep(self.delay)
        if any(e.payload.customer_id == self.poison for e in envelopes):
            raise RuntimeError("batch failed on purpose")


async def consume_in_batches(
    broker: Broker, single: Any, batch: BatchRecorder
) -> Consumer[PaymentRequested]:
    consumer = Consumer(
        broker,
        broker.topology.payment_requested,
        PaymentRequested,
        single,
        batch_handler=batch,
        retry_backoff_seconds=0.01,
    )
    await consumer.start()
    return consumer


async def test_a_backlog_is_handled_in_batches_and_every_message_acked(
    broker: Broker, topology: Topology
) -> None:
    envelopes = [payment_requested() for _ in range(100)]
    for envelope in envelopes:
        await broker.publish(envelope)
    single = Recorder()
    batches = BatchRecorder(delay=0.02)
    consumer = await consume_in_batches(broker, single, batches)
    try:
        await eventually(lambda: sum(map(len, batches.batches)) >= 100)
    finally:
        await consumer.stop(grace_seconds=5)
    # Anything left unacked went back to the queue when the consumer's channel closed.
    assert await queue_depth(broker, topology.payment_requested.name) == 0

    handled = [message_id for batch in batches.batches for message_id in batch]
    assert sorted(handled) == sorted(e.message_id for e in envelopes)
    assert single.calls == []
    assert max(map(len, batches.batches)) > 1
    assert max(map(len, batches.batches)) <= consumer.max_batch


class HeldBatches:
    """A batch handler whose first batch runs until `release` is set."""

    def __init__(self) -> None:
        self.batches: list[list[uuid.UUID]] = []
        self.release = asyncio.Event()

    async def __call__(self, envelopes: Sequence[Envelope[PaymentRequested]]) -> None:
        self.batches.append([e.message_id for e in envelopes])
        if len(self.batches) == 1:
            await self.release.wait()


@pytest.mark.parametrize("linger", [5.0, 0.05])
async def test_a_partial_batch_waits_a_while_for_the_running_one(
    broker: Broker, linger: float
) -> None:
    """Messages arriving one by one while a batch runs make one batch after it, not one
    batch each, unless the running batch outlasts the linger."""
    batches = HeldBatches()
    consumer = Consumer(
        broker,
        broker.topology.payment_requested,
        PaymentRequested,
        Recorder(),
        batch_handler=batches,
        max_linger_seconds=linger,
    )
    await consumer.start()
    try:
        first = payment_requested()
        await broker.publish(first)
        await eventually(lambda: batches.batches == [[first.message_id]])
        later = [payment_requested() for _ in range(5)]
        for envelope in later:
            await broker.publish(envelope)
            await asyncio.sleep(0.03)
        if linger > 1:
            assert batches.batches == [[first.message_id]]
        else:
            # Each waited 0.05 s at most: the running batch no longer held them back.
            await eventually(lambda: sum(map(len, batches.batches)) == 6, within=2)
            assert not batches.release.is_set()
        batches.release.set()
        await eventually(lambda: sum(map(len, batches.batches)) == 6)
    finally:
        batches.release.set()
        await consumer.stop(grace_seconds=5)

    assert sorted(m for batch in batches.batches[1:] for m in batch) == sorted(
        e.message_id for e in later
    )
    if linger > 1:
        assert len(batches.batches) == 2
    else:
        assert len(batches.batches) > 2


async def test_a_failed_batch_is_retried_one_message_at_a_time(
    broker: Broker, topology: Topology
) -> None:
    """One bad message fails its batch; the others still succeed, and it alone is parked."""
    good = [payment_requested() for _ in range(20)]
    bad = payment_requested(customer_id="poison")
    for envelope in [*good[:10], bad, *good[10:]]:
        await broker.publish(envelope)

    async def single(envelope: Envelope[PaymentRequested]) -> None:
        await batches([envelope])

    batches = BatchRecorder(poison="poison")
    consumer = await consume_in_batches(broker, single, batches)
    try:
        await eventually(lambda: queue_depth(broker, topology.payment_requested.parking))
    finally:
        await consumer.stop(grace_seconds=5)
    assert await queue_depth(broker, topology.payment_requested.name) == 0

    succeeded = {
        message_id
        for batch in batches.batches
        if bad.message_id not in batch
        for message_id in batch
    }
    assert succeeded == {e.message_id for e in good}
    # The bad one: in a failed batch, then alone (here and on each redelivery) until the
    # delivery limit parks it.
    alone = [batch for batch in batches.batches if batch == [bad.message_id]]
    assert len(alone) == topology.delivery_limit
    parked = await get_one(broker, topology.payment_requested.parking)
    assert parked.message_id == str(bad.message_id)
    assert parked.headers["x-parked-reason"] == "retries_exhausted"


class OutOfOrderBatches:
    """A batch handler whose first batch ends only after every later one has ended."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.batches: list[list[uuid.UUID]] = []
        self.handled = 0
        self.others_done = asyncio.Event()

    async def __call__(self, envelopes: Sequence[Envelope[PaymentRequested]]) -> None:
        self.batches.append([e.message_id for e in envelopes])
        first = len(self.batches) == 1
        if first:
            await self.others_done.wait()
        self.handled += len(envelopes)
        if self.handled == self.total - len(self.batches[0]):
            self.others_done.set()


async def test_batches_that_end_out_of_order_are_each_acked_once_in_few_frames(
    broker: Broker, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first batch holds the watermark while the others end: theirs are acked singly,
    then its own in one multiple ack. Nothing is acked twice (the broker would close the
    channel), nothing is left unacked (it would come back after the stop)."""
    frames: list[tuple[int, bool]] = []
    send_ack = aiormq.Channel.basic_ack

    async def counted(self: aiormq.Channel, tag: int, multiple: bool = False, **kw: Any) -> None:
        frames.append((tag, multiple))
        await send_ack(self, tag, multiple=multiple, **kw)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", counted)
    total = 120
    for _ in range(total):
        await broker.publish(payment_requested())
    single = Recorder()
    batches = OutOfOrderBatches(total)
    consumer = await consume_in_batches(broker, single, batches)
    try:
        await eventually(lambda: batches.handled == total)
        await eventually(consumer.settled)
    finally:
        await consumer.stop(grace_seconds=5)

    assert await queue_depth(broker, topology.payment_requested.name) == 0
    assert single.calls == [], "a message came back: its ack was lost or refused"
    assert len(batches.batches) > 1
    first = len(batches.batches[0])
    # The first batch's messages, below every other: one multiple ack covers them all.
    assert sum(1 for _, multiple in frames if multiple) >= 1
    assert len(frames) <= total - first + 1


async def test_acks_from_many_flushes_at_once_keep_the_channel_open(
    broker: Broker, topology: Topology
) -> None:
    """Deliveries finishing in a random order, a few at a time, make flushes that overlap:
    each one's frames must reach the broker before the next one's, or a multiple ack
    covers a tag whose single ack is still to be written, and the broker closes the
    channel for the unknown tag."""
    total = 600
    for _ in range(total):
        await broker.publish(payment_requested())
    channel = await broker.connection.channel()
    await channel.set_qos(prefetch_count=total)
    queue = await channel.get_queue(topology.payment_requested.name)
    underlay = await channel.get_underlay_channel()
    acks = ChannelAcks(underlay)
    delivered: list[int] = []

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert message.delivery_tag is not None
        acks.delivered(message.delivery_tag)
        delivered.append(message.delivery_tag)

    tag = await queue.consume(on_message)
    try:
        await eventually(lambda: len(delivered) == total)
        order = list(delivered)
        random.Random(7).shuffle(order)
        pending: list[asyncio.Task[None]] = []
        for start in range(0, total, 5):
            pending += [asyncio.create_task(acks.ack(t)) for t in order[start : start + 5]]
            await asyncio.sleep(0)
        await asyncio.gather(*pending)
        assert not underlay.is_closed
        await queue.cancel(tag)
    finally:
        await channel.close()
    assert await queue_depth(broker, topology.payment_requested.name) == 0
