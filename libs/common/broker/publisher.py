"""Publishing that either gets the broker's confirmation or raises: never a silent loss.

Each publish is persistent, `mandatory` (an unroutable message comes back and raises
instead of vanishing) and waits for the publisher confirm, all within one timeout. A
timeout does not prove the broker lacks the message, so a caller that retries may
publish it twice; consumers deduplicate on `message_id`.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import time
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from libs.common.messages import Envelope, encode
from libs.common.metrics import MESSAGES_PUBLISHED, PUBLISH_DURATION, PUBLISH_FAILURES

log = logging.getLogger(__name__)


class PublishError(Exception):
    """The message was not confirmed by the broker; it may or may not have been stored."""

    reason = "failed"


class PublishTimeout(PublishError):
    reason = "timeout"


class MessageUnroutable(PublishError):
    """No queue is bound for the routing key: the broker returned the message."""

    reason = "unroutable"


class MessageNacked(PublishError):
    reason = "nacked"


class BrokerUnavailable(PublishError):
    reason = "unavailable"


def to_amqp(envelope: Envelope[Any], headers: dict[str, Any] | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        body=encode(envelope),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(envelope.message_id),
        correlation_id=envelope.correlation_id,
        type=envelope.type,
        timestamp=envelope.occurred_at.astimezone(dt.UTC),
        headers={"x-version": envelope.version, **(headers or {})},
    )


def republishable(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """`message` again, persistent, with `headers` instead of its own (parking, replay)."""
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        timestamp=message.timestamp,
    )


class Publisher:
    """Publishes to named exchanges over one confirm-mode channel."""

    # A channel is renewed at most this often, however many failures come meanwhile.
    RENEW_AT_MOST_EVERY_SECONDS = 1.0
    # This many publishes timing out within the window says the channel is stuck.
    TIMEOUTS_TO_RENEW = 3
    TIMEOUT_WINDOW_SECONDS = 5.0

    def __init__(self, channel: AbstractChannel, *, timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout
        self._exchanges: dict[str, AbstractExchange] = {}
        self._renewing: asyncio.Task[None] | None = None
        self._renewed_at = -self.RENEW_AT_MOST_EVERY_SECONDS
        self._timeouts: collections.deque[float] = collections.deque(maxlen=self.TIMEOUTS_TO_RENEW)
        self.renewals = 0

    async def publish(
        self, envelope: Envelope[Any], *, exchange: str, unroutable_is_failure: bool = True
    ) -> None:
        """Publish `envelope` under its own type as routing key."""
        await self.publish_message(
            to_amqp(envelope),
            exchange=exchange,
            routing_key=envelope.type,
            unroutable_is_failure=unroutable_is_failure,
        )

    async def publish_message(
        self,
        message: aio_pika.Message,
        *,
        exchange: str,
        routing_key: str,
        unroutable_is_failure: bool = True,
    ) -> None:
        """Publish, confirmed, or raise. An event nobody subscribed to comes back
        unroutable too; its publisher passes `unroutable_is_failure=False` so that it is
        not counted as a failure (it still raises MessageUnroutable)."""
        # Every attempt is timed, confirmed or not: on a cluster losing a node, the
        # confirm latency is what clients feel.
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                target = await self._exchange(exchange)
                await target.publish(message, routing_key, mandatory=True)
        except TimeoutError as exc:
            # Publishes that keep timing out, rather than one slow confirm: the channel,
            # not the broker, may be what is stuck (see _renew_channel).
            now = time.monotonic()
            self._timeouts.append(now)
            if (
                len(self._timeouts) == self.TIMEOUTS_TO_RENEW
                and now - self._timeouts[0] < self.TIMEOUT_WINDOW_SECONDS
            ):
                self._timeouts.clear()
                self._renew_channel()
            raise self._failed(PublishTimeout, routing_key, "no confirm in time") from exc
        except aio_pika.exceptions.PublishError as exc:
            if not unroutable_is_failure:
                raise MessageUnroutable(f"no queue bound for {routing_key!r}") from exc
            raise self._failed(MessageUnroutable, routing_key, "no queue bound") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            self._renew_channel()
            raise self._failed(MessageNacked, routing_key, "broker refused it") from exc
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,
            ConnectionError,
            OSError,
        ) as exc:
            raise self._failed(BrokerUnavailable, routing_key, repr(exc)) from exc
        finally:
            PUBLISH_DURATION.labels(routing_key=routing_key).observe(time.perf_counter() - started)
        MESSAGES_PUBLISHED.labels(routing_key=routing_key).inc()

    def _renew_channel(self) -> None:
        """After a nack, or publishes that keep timing out, publish over a new channel
        from now on (the switch happens in the background).

        A nack says the broker could not take the message. On a cluster it can also be
        the channel's own stale view of a quorum queue: a channel that first published
        to a queue while the queue's leader node was down keeps asking that node, and
        keeps nacking, until it is back (RabbitMQ 3.10's quorum queue client); commands
        sent to a leader that has just stopped wait for a resend instead. A new channel
        starts from the queue's current leader. Closing the AMQP channel under the
        robust one makes aio-pika open a new one in its place, as after any loss;
        publishes still waiting on the old one fail, and their clients retry.
        """
        now = time.monotonic()
        if self._renewing is not None or now - self._renewed_at < self.RENEW_AT_MOST_EVERY_SECONDS:
            return
        self._renewed_at = now
        self.renewals += 1
        log.warning("publishing over a new channel after a failed publish")
        self._renewing = asyncio.create_task(self._close_underlay(), name="renew channel")

    async def _close_underlay(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                underlay = await self._channel.get_underlay_channel()
                await underlay.close()
        except (aiormq.exceptions.AMQPError, RuntimeError, OSError, TimeoutError):
            pass  # the connection is going anyway: it brings a new channel when back
        finally:
            self._renewing = None

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            # Declared by the topology at start; ensure=False avoids a round trip per name.
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    @staticmethod
    def _failed(kind: type[PublishError], routing_key: str, detail: str) -> PublishError:
        PUBLISH_FAILURES.labels(routing_key=routing_key, reason=kind.reason).inc()
        return kind(f"message to {routing_key!r} not confirmed ({kind.reason}): {detail}")
