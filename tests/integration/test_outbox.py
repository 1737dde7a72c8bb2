"""Events out: every applied transition's event is in the outbox, and the relay publishes
them in sequence, with confirms, at least once, the same message each time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractQueue

from libs.common.broker.connection import Broker
from libs.common.broker.publisher import BrokerUnavailable
from libs.common.db import Connection, Database
from libs.common.logs import correlation_scope
from libs.common.messages import Envelope, PaymentEvent, decode
from libs.common.metrics import EVENTS_PUBLISHED, PUBLISH_FAILURES
from libs.common.outbox import OutboxRelay
from libs.common.state_machine import TransitionRequest, apply_transitions
from libs.common.states import PaymentStatus, TransitionSource
from tests.integration.test_state_machine import insert_payment
from tests.payments_data import create_payment
from tests.payments_data import move_to as apply_transition
from tests.support import eventually

P = PaymentStatus


def relay(db: Database, broker: Broker, batch_size: int = 100) -> OutboxRelay:
    return OutboxRelay(db, broker, batch_size=batch_size, poll_interval=0.05, retention_days=30)


async def outbox_of(db: Database, payment_id: uuid.UUID) -> list[dict[str, object]]:
    rows = await db.fetch(
        "SELECT sequence, type, payload, correlation_id, published_at, attempts"
        " FROM payments.outbox WHERE payment_id = $1 ORDER BY id",
        payment_id,
    )
    return [dict(row) for row in rows]


@pytest.fixture
async def subscriber(broker: Broker) -> AsyncIterator[AbstractQueue]:
    """A queue of the test's own bound to payment.#, as README tells subscribers to."""
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(broker.topology.exchange, routing_key="payment.#")
    yield queue
    await channel.close()


async def drain(queue: AbstractQueue, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    got: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def take() -> bool:
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            got.append(message)
        return len(got) >= count

    await eventually(take, within=10)
    return got


async def test_an_applied_transition_writes_one_event_and_a_refused_one_none(
    db: Database,
) -> None:
    payment_id = uuid.uuid4()
    with correlation_scope("corr-events"):
        await db.transaction(lambda conn: create_payment(conn, payment_id))
        moved = await db.transaction(
            lambda conn: apply_transition(
                conn, payment_id, P.PROCESSING, source=TransitionSource.PROVIDER, reason="ch_1"
            )
        )
        refused = await db.transaction(
            lambda conn: apply_transition(
                conn, payment_id, P.PROCESSING, source=TransitionSource.WEBHOOK
            )
        )
    assert moved.applied
    assert not refused.applied
    events = await outbox_of(db, payment_id)
    assert [(e["sequence"], e["type"]) for e in events] == [
        (1, "payment.pending"),
        (2, "payment.processing"),
    ]
    payload = events[1]["payload"]
    assert isinstance(payload, dict)
    assert payload["previous_status"] == "pending"
    assert payload["status"] == "processing"
    assert payload["source"] == "provider"
    assert payload["reason"] == "ch_1"
    assert payload["amount_minor"] == 10000
    assert events[1]["correlation_id"] == "corr-events"
    assert all(e["published_at"] is None for e in events)
    # Every stored payload is a valid event of its type.
    for event in events:
        assert PaymentEvent.model_validate(event["payload"]).message_type() == event["type"]


async def test_a_rolled_back_transition_leaves_no_event(db: Database) -> None:
    payment_id = await insert_payment(db)

    async def move_then_fail(conn: Connection) -> None:
        await apply_transition(conn, payment_id, P.FAILED, source=TransitionSource.RECONCILER)
        raise RuntimeError("the caller's transaction fails after the move")

    with pytest.raises(RuntimeError):
        await db.transaction(move_then_fail)
    assert await outbox_of(db, payment_id) == []


async def test_a_batch_numbers_each_payments_events_on(db: Database) -> None:
    first, second = await insert_payment(db), await insert_payment(db, P.PROCESSING)
    results = await db.transaction(
        lambda conn: apply_transitions(
            conn,
            [
                TransitionRequest(first, P.PROCESSING, TransitionSource.PROVIDER),
                TransitionRequest(second, P.PROCESSING, TransitionSource.PROVIDER),
            ],
        )
    )
    assert [r.applied for r in results] == [True, False]
    await db.transaction(
        lambda conn: apply_transitions(
            conn,
            [
                TransitionRequest(first, P.COMPLETED, TransitionSource.WEBHOOK),
                TransitionRequest(second, P.FAILED, TransitionSource.WEBHOOK, failure_reason="x"),
            ],
        )
    )
    assert [(e["sequence"], e["type"]) for e in await outbox_of(db, first)] == [
        (1, "payment.processing"),
        (2, "payment.completed"),
    ]
    [failed] = await outbox_of(db, second)
    assert (failed["sequence"], failed["type"]) == (1, "payment.failed")
    assert isinstance(failed["payload"], dict)
    assert failed["payload"]["failure_reason"] == "x"
    assert failed["payload"]["previous_status"] == "processing"


async def test_concurrent_moves_of_one_payment_never_share_a_number(db: Database) -> None:
    payment_id = await insert_payment(db)
    targets = [P.PROCESSING, P.COMPLETED, P.FAILED, P.REFUNDED] * 3
    await asyncio.gather(
        *(
            db.transaction(
                lambda conn, to=to: apply_transition(
                    conn, payment_id, to, source=TransitionSource.WEBHOOK
                )
            )
            for to in targets
        )
    )
    events = await outbox_of(db, payment_id)
    applied = await db.fetch(
        "SELECT to_status FROM payments.payment_events WHERE payment_id = $1 AND applied"
        " ORDER BY id",
        payment_id,
    )
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events] == [f"payment.{row['to_status']}" for row in applied]


async def test_the_relay_publishes_each_event_once_in_sequence_and_marks_it(
    db: Database, broker: Broker, subscriber: AbstractQueue
) -> None:
    payment_id = await insert_payment(db)
    for to in (P.PROCESSING, P.COMPLETED):
        await db.transaction(
            lambda conn, to=to: apply_transition(
                conn, payment_id, to, source=TransitionSource.WEBHOOK
            )
        )
    done = await relay(db, broker).relay_once()
    assert done.taken == 2
    assert len(done.published) == 2
    assert not done.failed

    messages = await drain(subscriber, 2)
    envelopes: list[Envelope[PaymentEvent]] = [decode(m.body, PaymentEvent) for m in messages]
    assert [m.routing_key for m in messages] == ["payment.processing", "payment.completed"]
    assert [e.payload.sequence for e in envelopes] == [1, 2]
    stored = await db.fetch(
        "SELECT event_id, published_at FROM payments.outbox WHERE payment_id = $1 ORDER BY id",
        payment_id,
    )
    assert [m.message_id for m in messages] == [str(row["event_id"]) for row in stored]
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in messages)
    assert all(row["published_at"] is not None for row in stored)
    again = await relay(db, broker).relay_once()
    assert again.taken == 0
    assert await subscriber.get(fail=False) is None


async def test_an_event_nobody_subscribed_to_is_marked_published_and_counted(
    db: Database, broker: Broker
) -> None:
    payment_id = await insert_payment(db)
    await db.transaction(
        lambda conn: apply_transition(conn, payment_id, P.FAILED, source=TransitionSource.WEBHOOK)
    )
    unroutable = EVENTS_PUBLISHED.labels(type="payment.failed", outcome="unroutable")
    failures = PUBLISH_FAILURES.labels(routing_key="payment.failed", reason="unroutable")
    before, failures_before = unroutable._value.get(), failures._value.get()
    done = await relay(db, broker).relay_once()
    assert len(done.published) == 1
    assert unroutable._value.get() == before + 1
    # Not a failure: the publish-failure alert must not fire for want of subscribers.
    assert failures._value.get() == failures_before
    [event] = await outbox_of(db, payment_id)
    assert event["published_at"] is not None


class FlakyBroker:
    """The real broker, whose publishes fail while `down` is set."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.down = True

    @property
    def is_connected(self) -> bool:
        return True

    async def publish(
        self, envelope: Envelope[PaymentEvent], *, unroutable_is_failure: bool = True
    ) -> None:
        if self.down:
            raise BrokerUnavailable("simulated")
        await self.broker.publish(envelope, unroutable_is_failure=unroutable_is_failure)


async def test_an_unconfirmed_event_stays_and_holds_back_its_payments_later_ones(
    db: Database, broker: Broker, subscriber: AbstractQueue
) -> None:
    payment_id = await insert_payment(db)
    for to in (P.PROCESSING, P.COMPLETED):
        await db.transaction(
            lambda conn, to=to: apply_transition(
                conn, payment_id, to, source=TransitionSource.WEBHOOK
            )
        )
    flaky = FlakyBroker(broker)
    failing = OutboxRelay(db, flaky, batch_size=10, poll_interval=0.05, retention_days=30)  # type: ignore[arg-type]
    done = await failing.relay_once()
    # The first failed; the second was not even tried, so it cannot overtake the first.
    assert len(done.failed) == 1
    assert not done.published
    events = await outbox_of(db, payment_id)
    assert [(e["attempts"], e["published_at"]) for e in events] == [(1, None), (0, None)]
    flaky.down = False
    done = await failing.relay_once()
    assert len(done.published) == 2
    messages = await drain(subscriber, 2)
    assert [decode(m.body, PaymentEvent).payload.sequence for m in messages] == [1, 2]


async def test_a_crash_before_marking_publishes_the_same_message_again(
    db: Database, broker: Broker, subscriber: AbstractQueue
) -> None:
    payment_id = await insert_payment(db)
    await db.transaction(
        lambda conn: apply_transition(
            conn, payment_id, P.COMPLETED, source=TransitionSource.WEBHOOK
        )
    )

    class CrashingRelay(OutboxRelay):
        async def _publish(self, rows, outcome):  # type: ignore[no-untyped-def]
            await super()._publish(rows, outcome)
            raise RuntimeError("killed after publishing, before the commit")

    with pytest.raises(RuntimeError):
        await CrashingRelay(
            db, broker, batch_size=10, poll_interval=0.05, retention_days=30
        ).relay_once()
    [event] = await outbox_of(db, payment_id)
    assert event["published_at"] is None
    await relay(db, broker).relay_once()
    first, second = await drain(subscriber, 2)
    assert first.message_id == second.message_id
    assert first.body == second.body


async def test_two_relays_take_turns_and_publish_nothing_twice(
    db: Database, broker: Broker, subscriber: AbstractQueue
) -> None:
    payments = [await insert_payment(db) for _ in range(20)]
    for to in (P.PROCESSING, P.COMPLETED):
        await db.transaction(
            lambda conn, to=to: apply_transitions(
                conn, [TransitionRequest(p, to, TransitionSource.WEBHOOK) for p in payments]
            )
        )
    relays = [relay(db, broker, batch_size=5), relay(db, broker, batch_size=5)]

    async def drained() -> bool:
        await asyncio.gather(*(r.relay_once() for r in relays))
        backlog, _ = await relays[0].measure_backlog()
        return backlog == 0

    await eventually(drained, within=20)
    messages = await drain(subscriber, 40)
    assert len(messages) == 40
    assert len({m.message_id for m in messages}) == 40
    seen: dict[uuid.UUID, list[int]] = {}
    for m in messages:
        event = decode(m.body, PaymentEvent).payload
        seen.setdefault(event.payment_id, []).append(event.sequence)
    assert all(sequences == [1, 2] for sequences in seen.values())


async def test_the_gauges_and_the_pruning(db: Database, broker: Broker) -> None:
    old, recent = await insert_payment(db), await insert_payment(db)
    for payment_id in (old, recent):
        await db.transaction(
            lambda conn, p=payment_id: apply_transition(
                conn, p, P.FAILED, source=TransitionSource.WEBHOOK
            )
        )
    await db.fetch(
        "UPDATE payments.outbox SET created_at = now() - interval '40 days' WHERE payment_id = $1",
        old,
    )
    the_relay = relay(db, broker)
    backlog, oldest = await the_relay.measure_backlog()
    assert backlog == 2
    assert oldest > 39 * 86400
    # Never an unsent one, however old.
    assert await the_relay.prune() == 0
    await the_relay.relay_once()
    assert await the_relay.measure_backlog() == (0, 0.0)
    assert await the_relay.prune() == 1
    assert await outbox_of(db, old) == []
    assert len(await outbox_of(db, recent)) == 1
