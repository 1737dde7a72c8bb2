"""One robust RabbitMQ connection per process, with the topology declared and a publisher.

aio-pika's robust connection reconnects by itself and restores channels, queues and
consumers, so a broker restart heals without a service restart; given several nodes of
a cluster (RABBITMQ_URL, comma-separated), it moves to the next node instead of waiting
for the lost one (libs.common.broker.failover). While it is away, publishes fail fast
(within the publish timeout) and /ready says not ready.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from libs.common.broker.failover import connect_failover
from libs.common.broker.publisher import BrokerUnavailable, Publisher
from libs.common.broker.topology import Topology, declare
from libs.common.messages import Envelope
from libs.common.metrics import PUBLISH_FAILURES
from libs.common.settings import BrokerSettings


class Broker:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        publish_channel: AbstractRobustChannel,
        topology: Topology,
        publisher: Publisher,
        prefetch: int,
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.publisher = publisher
        self.prefetch = prefetch
        self._publish_channel = publish_channel

    @classmethod
    async def connect(
        cls,
        settings: BrokerSettings,
        *,
        name: str,
        topology: Topology | None = None,
        declare_topology: bool = True,
    ) -> Broker:
        """Connect, open the publishing channel and (by default) declare the topology.

        Services declare the topology so that nothing they publish is unroutable; a tool
        that only inspects passes `declare_topology=False` so that pointing it at the
        wrong vhost creates nothing there.
        """
        topology = topology or Topology()
        nodes = settings.rabbitmq_node_urls()
        # The first connection must fail in bounded time (a robust connection would
        # otherwise keep retrying some failures, such as an unresolvable host, forever);
        # each node of a cluster gets its own attempt.
        within = settings.rabbitmq_connect_timeout_seconds * (len(nodes) + 1)
        async with asyncio.timeout(within):
            connection = await connect_failover(
                nodes,
                heartbeat=settings.rabbitmq_heartbeat_seconds,
                reconnect_interval=settings.rabbitmq_reconnect_interval_seconds,
                attempt_seconds=settings.rabbitmq_connect_timeout_seconds,
                client_properties={"connection_name": name},
            )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            if declare_topology:
                await declare(channel, topology)
        except BaseException:
            await connection.close()
            raise
        publisher = Publisher(channel, timeout=settings.publish_timeout_seconds)
        return cls(connection, channel, topology, publisher, settings.consumer_prefetch)

    @property
    def is_connected(self) -> bool:
        return not self.connection.is_closed and self.connection.connected.is_set()

    async def ping(self, within_seconds: float = 2.0) -> None:
        """Raise unless the connection is up (for /ready)."""
        if not self.is_connected:
            raise ConnectionError("not connected to RabbitMQ")
        async with asyncio.timeout(within_seconds):
            await self._publish_channel.get_underlay_channel()

    async def publish(self, envelope: Envelope[Any], *, unroutable_is_failure: bool = True) -> None:
        """Publish a message to the platform's exchange, routed by its type."""
        if not self.is_connected:
            # Fail at once while reconnecting, rather than wait out the publish timeout.
            PUBLISH_FAILURES.labels(routing_key=envelope.type, reason="unavailable").inc()
            raise BrokerUnavailable(f"message to {envelope.type!r} not sent: broker disconnected")
        await self.publisher.publish(
            envelope, exchange=self.topology.exchange, unroutable_is_failure=unroutable_is_failure
        )

    async def new_channel(self) -> AbstractRobustChannel:
        return await self.connection.channel()

    async def close(self) -> None:
        await self.connection.close()
