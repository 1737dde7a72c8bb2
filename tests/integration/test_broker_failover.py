"""Failover between the URLs of RABBITMQ_URL, against the real RabbitMQ.

Two TCP proxies in front of the one broker stand for two cluster nodes: cutting the one
a connection goes through is, to the client, losing that node. (tests/cluster runs the
same against a real three-node cluster.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiormq
import pytest

from libs.common.broker.connection import Broker
from libs.common.broker.consumer import Consumer
from libs.common.broker.failover import FailoverConnection
from libs.common.broker.publisher import PublishError
from libs.common.broker.topology import Topology, delete
from libs.common.messages import PaymentRequested
from libs.common.settings import PaymentsSettings
from tests.faults.harness import url_via
from tests.integration.test_broker import (
    HeldBatches,
    Recorder,
    get_one,
    payment_requested,
    queue_depth,
)
from tests.support import eventually, free_port
from tests.tcp_proxy import TcpProxy


@pytest.fixture
async def proxies(rabbitmq_url: str) -> AsyncIterator[list[TcpProxy]]:
    broker = urlsplit(rabbitmq_url)
    started = [TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) for _ in range(2)]
    for proxy in started:
        await proxy.start()
    yield started
    for proxy in started:
        await proxy.close()


def settings_for(settings: PaymentsSettings, urls: list[str]) -> PaymentsSettings:
    return settings.model_copy(
        update={
            "rabbitmq_url": type(settings.rabbitmq_url)(",".join(urls)),
            "rabbitmq_connect_timeout_seconds": 2.0,
        }
    )


async def published(broker: Broker) -> bool:
    """Whether a publish is confirmed now."""
    try:
        await broker.publish(payment_requested())
    except PublishError:
        return False
    return True


@pytest.fixture
async def cleanup(settings: PaymentsSettings, topology: Topology) -> AsyncIterator[None]:
    yield
    broker = await Broker.connect(settings, name="tests", topology=topology)
    async with broker.connection.channel() as channel:
        await delete(channel, topology)
    await broker.close()


async def test_a_node_that_does_not_answer_at_start_is_skipped(
    settings: PaymentsSettings, rabbitmq_url: str, topology: Topology, cleanup: None
) -> None:
    nobody = url_via(rabbitmq_url, free_port())
    for order in ([nobody, rabbitmq_url], [rabbitmq_url, nobody]):
        broker = await Broker.connect(settings_for(settings, order), name="t", topology=topology)
        try:
            assert broker.is_connected
            connection = broker.connection
            assert isinstance(connection, FailoverConnection)
            assert str(connection.url.with_query(None)) == rabbitmq_url
        finally:
            await broker.close()


async def test_losing_the_node_moves_publisher_and_consumer_to_the_next(
    settings: PaymentsSettings,
    rabbitmq_url: str,
    topology: Topology,
    proxies: list[TcpProxy],
    cleanup: None,
) -> None:
    urls = [url_via(rabbitmq_url, proxy.port) for proxy in proxies]
    broker = await Broker.connect(settings_for(settings, urls), name="t", topology=topology)
    try:
        [used] = [p for p in proxies if p.connections]
        [other] = [p for p in proxies if p is not used]
        await used.cut()  # and refuse: that node is gone until restored
        await eventually(lambda: published(broker), within=20, interval=0.2)
        assert other.connections == 1
        assert used.connections == 0
        message = await get_one(broker, topology.payment_requested.name)
        assert message.message_id
    finally:
        await broker.close()


async def test_one_url_still_waits_for_its_one_node(
    settings: PaymentsSettings,
    rabbitmq_url: str,
    topology: Topology,
    proxies: list[TcpProxy],
    cleanup: None,
) -> None:
    proxy = proxies[0]
    urls = [url_via(rabbitmq_url, proxy.port)]
    broker = await Broker.connect(settings_for(settings, urls), name="t", topology=topology)
    try:
        await proxy.cut()
        await eventually(lambda: not broker.is_connected, within=5)
        proxy.restore()
        # Connected comes before the channels are restored: wait for a confirm.
        await eventually(lambda: published(broker), within=20, interval=0.2)
        assert proxy.connections == 1
    finally:
        await broker.close()


async def test_a_nack_renews_the_publishing_channel(broker: Broker) -> None:
    """After a nack the publisher moves to a new channel, and publishing goes on."""
    channel = broker._publish_channel
    before = await channel.get_underlay_channel()
    broker.publisher._renew_channel()

    async def renewed() -> bool:
        if channel.is_closed:
            return False
        return await channel.get_underlay_channel() is not before

    await eventually(renewed, within=10)
    assert before.is_closed
    assert broker.publisher.renewals == 1
    await broker.publish(payment_requested())
    await get_one(broker, broker.topology.payment_requested.name)


async def settled_now(consumer: Consumer[PaymentRequested]) -> bool:
    """`consumer.settled()`, False while its channel is still being restored."""
    try:
        return await consumer.settled()
    except aiormq.exceptions.ChannelInvalidStateError:
        return False


async def test_acks_after_a_reconnect_name_the_new_channel_tags(
    settings: PaymentsSettings,
    rabbitmq_url: str,
    topology: Topology,
    proxies: list[TcpProxy],
    cleanup: None,
) -> None:
    """A batch that ends after its connection was cut cannot ack on the dead channel: its
    messages come back on the new one, whose tags count from 1 again, and are acked
    there by a ledger of their own. Afterwards nothing is left in the queue."""
    proxy = proxies[0]
    broker = await Broker.connect(
        settings_for(settings, [url_via(rabbitmq_url, proxy.port)]), name="t", topology=topology
    )
    envelopes = [payment_requested() for _ in range(30)]
    for envelope in envelopes:
        await broker.publish(envelope)
    held = HeldBatches()
    single = Recorder()
    consumer = Consumer(
        broker,
        topology.payment_requested,
        PaymentRequested,
        single,
        batch_handler=held,
        retry_backoff_seconds=0.01,
    )
    await consumer.start()
    try:
        await eventually(lambda: held.batches)
        await proxy.cut()
        proxy.restore()
        await eventually(lambda: broker.is_connected, within=20, interval=0.2)
        held.release.set()
        # The held batch's messages were not acked: they come back, and being redelivered
        # go one at a time, through the single handler.
        first = set(held.batches[0])
        want = {e.message_id for e in envelopes}
        await eventually(
            lambda: (
                first <= set(single.calls)
                and {m for b in held.batches for m in b} | set(single.calls) == want
            ),
            within=20,
        )
        await eventually(lambda: settled_now(consumer), within=10)
    finally:
        held.release.set()
        await consumer.stop(grace_seconds=5)
    assert await queue_depth(broker, topology.payment_requested.name) == 0
    await broker.close()
