"""Every exchange, queue and binding of the platform, declared in one place.

    publisher ──> <ns>.events (topic) ──routing key = message type──> <ns>.<queue> (quorum)
                                                                          │ rejected, or
                                                                          │ delivered too often
                                                                          ▼
                  <ns>.dead-letter (direct) ──routing key = queue name──> <ns>.<queue>.parking

Queues are quorum queues (replicated on a cluster, with a broker-enforced delivery
limit) that dead-letter at-least-once, so a message on its way to parking survives a
broker crash. Consumers park poison messages themselves, with the failure reason in the
headers; the delivery limit is the safety net for messages that crash the consumer
before it can say why.

Every service declares the whole topology at start. Declarations are idempotent, and a
publisher never sees "unroutable" just because its consumer has not started yet.
"""

from __future__ import annotations

import dataclasses

import aio_pika
from aio_pika.abc import AbstractChannel, ExchangeType
from pamqp.common import Arguments

from libs.common.messages import (
    Payload,
    PaymentRequested,
    ReconciliationRequested,
    RefundRequested,
    WebhookReceived,
)

DEFAULT_NAMESPACE = "platform"
DEFAULT_DELIVERY_LIMIT = 5


@dataclasses.dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    routing_keys: tuple[str, ...]

    @property
    def parking(self) -> str:
        return f"{self.name}.parking"


@dataclasses.dataclass(frozen=True, slots=True)
class Topology:
    namespace: str = DEFAULT_NAMESPACE
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    @property
    def exchange(self) -> str:
        return f"{self.namespace}.events"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dead-letter"

    def queue_for(self, payload_type: type[Payload], purpose: str | None = None) -> QueueSpec:
        """The queue a consumer of `payload_type` reads (one queue per consumer purpose)."""
        name = purpose or payload_type.TYPE.replace(".", "-")
        return QueueSpec(f"{self.namespace}.{name}", (payload_type.TYPE,))

    @property
    def payment_requested(self) -> QueueSpec:
        return self.queue_for(PaymentRequested)

    @property
    def webhook_received(self) -> QueueSpec:
        return self.queue_for(WebhookReceived)

    @property
    def reconciliation_requested(self) -> QueueSpec:
        return self.queue_for(ReconciliationRequested)

    @property
    def refund_requested(self) -> QueueSpec:
        return self.queue_for(RefundRequested)

    @property
    def queues(self) -> tuple[QueueSpec, ...]:
        return (
            self.payment_requested,
            self.webhook_received,
            self.reconciliation_requested,
            self.refund_requested,
        )

    def queue_arguments(self, queue: QueueSpec) -> Arguments:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": queue.name,
            # At-least-once dead-lettering needs publishers to be refused, not messages dropped,
            # when a queue is full.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


async def declare(channel: AbstractChannel, topology: Topology) -> None:
    """Declare (or confirm) every exchange, queue and binding of `topology`."""
    events = await channel.declare_exchange(topology.exchange, ExchangeType.TOPIC, durable=True)
    dead_letter = await channel.declare_exchange(
        topology.dead_letter_exchange, ExchangeType.DIRECT, durable=True
    )
    for spec in topology.queues:
        await declare_queue(channel, topology, spec, events=events, dead_letter=dead_letter)


async def declare_queue(
    channel: AbstractChannel,
    topology: Topology,
    spec: QueueSpec,
    *,
    events: aio_pika.abc.AbstractExchange,
    dead_letter: aio_pika.abc.AbstractExchange,
) -> None:
    parking = await channel.declare_queue(
        spec.parking, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await parking.bind(dead_letter, routing_key=spec.name)
    queue = await channel.declare_queue(
        spec.name, durable=True, arguments=topology.queue_arguments(spec)
    )
    for key in spec.routing_keys:
        await queue.bind(events, routing_key=key)


async def delete(channel: AbstractChannel, topology: Topology) -> None:
    """Remove everything `declare` made (for tests and tear-down tooling)."""
    for spec in topology.queues:
        await channel.queue_delete(spec.name)
        await channel.queue_delete(spec.parking)
    await channel.exchange_delete(topology.exchange)
    await channel.exchange_delete(topology.dead_letter_exchange)
