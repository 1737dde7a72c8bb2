"""When the publisher gives up on its channel: a nack, or publishes that keep timing out."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from libs.common.broker.publisher import MessageNacked, Publisher, PublishTimeout


class Underlay:
    def __init__(self) -> None:
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


class Exchange:
    def __init__(self, outcome: str) -> None:
        self.outcome = outcome

    async def publish(self, message: aio_pika.Message, routing_key: str, **_: Any) -> None:
        if self.outcome == "nack":
            raise aio_pika.exceptions.DeliveryError(None, None)  # type: ignore[arg-type]
        await asyncio.sleep(3600)  # a confirm that never comes


class Channel:
    def __init__(self, outcome: str) -> None:
        self.exchange = Exchange(outcome)
        self.underlay = Underlay()

    async def get_exchange(self, name: str, *, ensure: bool) -> Exchange:
        return self.exchange

    async def get_underlay_channel(self) -> Underlay:
        return self.underlay


async def publish(publisher: Publisher) -> None:
    await publisher.publish_message(aio_pika.Message(b"{}"), exchange="x", routing_key="k")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_nack_renews_the_channel_once_a_second_at_most() -> None:
    channel = Channel("nack")
    publisher = Publisher(channel, timeout=1.0)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(MessageNacked):
            await publish(publisher)
    await settle()
    assert publisher.renewals == 1
    assert channel.underlay.closed == 1


async def test_one_timeout_keeps_the_channel_three_renew_it() -> None:
    channel = Channel("silent")
    publisher = Publisher(channel, timeout=0.01)  # type: ignore[arg-type]
    for expected in (0, 0, 1):
        with pytest.raises(PublishTimeout):
            await publish(publisher)
        await settle()
        assert publisher.renewals == expected
    assert channel.underlay.closed == 1
