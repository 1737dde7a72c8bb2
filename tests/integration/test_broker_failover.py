"""Failover between the URLs of RABBITMQ_URL, against the real RabbitMQ.

Two TCP proxies in front of the one broker stand for two cluster nodes: cutting the one
a connection goes through is, to the client, losing that node. (tests/cluster runs the
same against a real three-node cluster.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from libs.common.broker.connection import Broker
from libs.common.broker.failover import FailoverConnection
from libs.common.broker.publisher import PublishError
from libs.common.broker.topology import Topology, delete
from libs.common.settings import PaymentsSettings
from tests.faults.harness import url_via
from tests.integration.test_broker import get_one, payment_requested
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
