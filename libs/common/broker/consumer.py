"""Runs a handler for each message of one queue, with explicit ack discipline.

For each delivery: decode the envelope, call the handler under the message's correlation
id, and ack only when the handler returned (it returns after its transaction committed).
A handler that raises gets the message back (nack with requeue) after a short backoff;
on the last allowed attempt, or when the message can never succeed (undecodable, or the
handler raised `PoisonMessage`), the message is parked: republished to the dead-letter
exchange with the reason in its headers, confirmed, and only then acked. The queue's
broker-side delivery limit parks messages that kill the process before it can do so.

With a batch handler, the messages that arrive together (up to the prefetch window) are
handed over as one batch, so the handler pays its database round trips and commits once
per batch; its messages are acked when it returned, in one frame where they can be
(libs.common.broker.acks). A batch that is not full waits
a little for the one already running, so that messages trickling in share a batch. If a
batch fails, each of its messages goes through the one-message path above, and so does
every redelivered message, so a bad message retries and parks on its own and never holds
up the others.

Redelivery is normal (a crash after commit and before ack redelivers a processed
message), so handlers must be idempotent; the inbox helper in libs.common.inbox makes
"record the message id and do the work" one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from libs.common.backoff import Backoff
from libs.common.broker.acks import ChannelAcks
from libs.common.broker.connection import Broker
from libs.common.broker.publisher import PublishError, republishable
from libs.common.broker.topology import QueueSpec
from libs.common.logs import correlation_scope
from libs.common.messages import Envelope, MessageDecodeError, P, decode
from libs.common.metrics import (
    MESSAGE_PROCESSING_DURATION,
    MESSAGES_CONSUMED,
    QUEUE_CONSUMERS,
    QUEUE_MESSAGES,
)
from libs.common.shutdown import Deadline, bounded, stop_task

log = logging.getLogger(__name__)

Handler = Callable[[Envelope[P]], Awaitable[None]]
BatchHandler = Callable[[Sequence[Envelope[P]]], Awaitable[None]]


class PoisonMessage(Exception):
    """Raised by a handler when retrying this message can never succeed."""


def delivery_count(message: AbstractIncomingMessage) -> int:
    """How many times this message was delivered before (quorum queues count for us)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


def _tag(message: AbstractIncomingMessage) -> int:
    if message.delivery_tag is None:  # only a message got with no_ack has none
        raise ValueError(f"message {message.message_id} has no delivery tag")
    return message.delivery_tag


class Consumer(Generic[P]):
    def __init__(
        self,
        broker: Broker,
        queue: QueueSpec,
        payload_type: type[P],
        handler: Handler[P],
        *,
        batch_handler: BatchHandler[P] | None = None,
        batches_in_flight: int = 4,
        max_linger_seconds: float = 0.05,
        prefetch: int | None = None,
        retry_backoff_seconds: float = 0.5,
        max_retry_backoff_seconds: float = 10.0,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.payload_type = payload_type
        self.handler = handler
        self.prefetch = prefetch or broker.prefetch
        self.batch_handler = batch_handler
        # Several batches at once, so the next one fills while one waits on its I/O.
        self.batches_in_flight = batches_in_flight
        self.max_batch = max(1, self.prefetch // batches_in_flight)
        # How long a partial batch may wait for the running one (see _form_batches).
        self.max_linger_seconds = max_linger_seconds
        self._waiting: list[tuple[Envelope[P], asyncio.Future[bool]]] = []
        self._batch_slots = asyncio.Semaphore(batches_in_flight)
        self._batcher: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        # Set on every arrival and every batch that ends.
        self._progress = asyncio.Event()
        self.retry_backoff = Backoff(retry_backoff_seconds, max_retry_backoff_seconds)
        # Park on the last attempt the broker would allow, so the reason travels along.
        self.max_attempts = broker.topology.delivery_limit
        self._channel: AbstractRobustChannel | None = None
        self._amqp_queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._gauge_task: asyncio.Task[None] | None = None
        self._gauge_channel: AbstractRobustChannel | None = None
        self.depth_interval_seconds = 5.0
        self._stopping = asyncio.Event()
        # One ledger per AMQP channel the deliveries came on (a reconnect opens another).
        self._acks: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, ChannelAcks] = (
            weakref.WeakKeyDictionary()
        )

    async def start(self) -> None:
        self._channel = await self.broker.new_channel()
        await self._channel.set_qos(prefetch_count=self.prefetch)
        self._amqp_queue = await self._channel.get_queue(self.queue.name, ensure=True)
        if self.batch_handler is not None:
            self._batcher = asyncio.create_task(
                self._form_batches(self.batch_handler), name="batcher"
            )
        self._consumer_tag = await self._amqp_queue.consume(self._on_message)
        # A channel of its own: aiormq closes a channel whose RPC is cancelled, and the
        # gauge is cancelled at stop, while in-flight messages still need theirs to ack.
        self._gauge_channel = await self.broker.new_channel()
        self._gauge_task = asyncio.create_task(
            self._measure_depth(self._gauge_channel), name="queue depth"
        )
        log.info("consuming", extra={"queue": self.queue.name, "prefetch": self.prefetch})

    async def _measure_depth(self, channel: AbstractRobustChannel) -> None:
        """Keep the queue-depth gauges current for this queue and its parking queue.

        It ends when `stop` sets `_stopping`, after the RPC in progress: a cancellation
        alone may be lost inside aiormq (see libs.common.shutdown), which once left this
        loop running and `stop` waiting for it forever."""
        while not self._stopping.is_set():
            try:
                underlay = await channel.get_underlay_channel()
                for name in (self.queue.name, self.queue.parking):
                    declared = await underlay.queue_declare(name, passive=True, timeout=5)
                    QUEUE_MESSAGES.labels(queue=name).set(declared.message_count or 0)
                    QUEUE_CONSUMERS.labels(queue=name).set(declared.consumer_count or 0)
            except (aio_pika.exceptions.AMQPError, RuntimeError, TimeoutError, OSError) as exc:
                log.debug("queue depth not measured", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.depth_interval_seconds):
                    await self._stopping.wait()

    @property
    def in_flight(self) -> int:
        """Messages taken from the queue and not yet acked, rejected or given back."""
        return len(self._in_flight)

    async def settled(self) -> bool:
        """Whether nothing is left to do: no message ready in the queue, none in flight.

        Asked on this consumer's own channel, whose frames arrive in order: a message the
        broker delivered (or took back on a nack) before it answered is, by the time the
        answer arrives, in flight here or counted as ready."""
        if self._channel is None or self.in_flight:
            return False
        underlay = await self._channel.get_underlay_channel()
        declared = await underlay.queue_declare(self.queue.name, passive=True, timeout=5)
        return not declared.message_count and not self.in_flight

    async def stop(self, grace_seconds: float) -> None:
        """Stop taking messages, let in-flight ones finish (or be redelivered), close.

        Every step is bounded, and all of them together by about `grace_seconds`: what
        does not finish in time is left for redelivery (its messages are unacked)."""
        deadline = Deadline(grace_seconds)
        self._stopping.set()
        if self._gauge_task is not None:
            # Usually ends at once; mid-RPC, after the RPC (at most its own timeout).
            await asyncio.wait({self._gauge_task}, timeout=deadline.left())
            await stop_task(self._gauge_task, deadline.left(), "queue depth gauge")
        if self._gauge_channel is not None and not self._gauge_channel.is_closed:
            await bounded(self._gauge_channel.close(), deadline.left(), "close gauge channel")
        if self._amqp_queue is not None and self._consumer_tag is not None:
            await bounded(
                self._amqp_queue.cancel(self._consumer_tag), deadline.left(), "cancel consumer"
            )
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=deadline.left(0))
            if pending:
                # Their messages stay unacked and return to the queue when the channel closes.
                log.warning("in-flight messages left for redelivery", extra={"n": len(pending)})
                for task in pending:
                    task.cancel()
        await stop_task(self._batcher, deadline.left(), "batcher")
        if self._channel is not None and not self._channel.is_closed:
            await bounded(self._channel.close(), deadline.left(), "close consumer channel")

    def _acks_of(self, message: AbstractIncomingMessage) -> ChannelAcks:
        acks = self._acks.get(message.channel)
        if acks is None:
            acks = self._acks[message.channel] = ChannelAcks(message.channel)
        return acks

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        await self._acks_of(message).ack(_tag(message))

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        await self._acks_of(message).nack(_tag(message), requeue=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Before any await: the ledger learns of deliveries in the order they came.
        self._acks_of(message).delivered(_tag(message))
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        started = time.perf_counter()
        try:
            # A redelivered message failed before (or its consumer died): it goes alone,
            # so it cannot fail a batch of others again.
            batched = self.batch_handler is not None and delivery_count(message) == 0
            outcome = await self._in_batch(message) if batched else None
            if outcome is None:
                outcome = await self._process(message)
        finally:
            if task is not None:
                self._in_flight.discard(task)
        MESSAGES_CONSUMED.labels(queue=self.queue.name, outcome=outcome).inc()
        MESSAGE_PROCESSING_DURATION.labels(queue=self.queue.name).observe(
            time.perf_counter() - started
        )

    async def _in_batch(self, message: AbstractIncomingMessage) -> str | None:
        """Process `message` in the next batch; None if it must go the one-message way."""
        try:
            envelope = decode(message.body, self.payload_type)
        except MessageDecodeError:
            return None  # parked by the one-message path, with the reason
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((envelope, done))
        self._arrived.set()
        self._progress.set()
        if not await done:
            return None
        await self._ack(message)
        return "processed"

    async def _form_batches(self, handler: BatchHandler[P]) -> None:
        """Hand what has arrived to the batch handler, at most `batches_in_flight` at once.

        A full batch starts as soon as a slot is free, so a backlog keeps every slot busy.
        A partial one first waits, at most `max_linger_seconds`, for the batch already
        running: what arrives meanwhile joins it. At a steady moderate rate that makes a
        few larger batches instead of many of one or two messages, each paying the same
        round trips and commits (docs/decisions/0001-performance.md).
        """
        batches: set[asyncio.Task[None]] = set()

        def ended(task: asyncio.Task[None]) -> None:
            batches.discard(task)
            self._progress.set()

        try:
            while True:
                await self._arrived.wait()
                await self._batch_slots.acquire()
                # Deliveries of one prefetch window arrive together: let them all land.
                await asyncio.sleep(0)
                await self._linger(batches)
                batch, self._waiting = (
                    self._waiting[: self.max_batch],
                    self._waiting[self.max_batch :],
                )
                if not self._waiting:
                    self._arrived.clear()
                task = asyncio.create_task(self._run_batch(handler, batch), name="batch")
                batches.add(task)
                task.add_done_callback(ended)
        finally:
            for task in batches:
                task.cancel()

    async def _linger(self, running: set[asyncio.Task[None]]) -> None:
        """Wait while a batch runs and the next is not full, up to `max_linger_seconds`."""
        if not running or len(self._waiting) >= self.max_batch:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.max_linger_seconds):
                while running and len(self._waiting) < self.max_batch:
                    self._progress.clear()
                    await self._progress.wait()

    async def _run_batch(
        self, handler: BatchHandler[P], batch: list[tuple[Envelope[P], asyncio.Future[bool]]]
    ) -> None:
        succeeded = False
        try:
            await handler([envelope for envelope, _ in batch])
            succeeded = True
        except Exception as exc:  # noqa: BLE001 - its messages are retried one by one
            log.warning(
                "batch failed; its messages are processed one by one",
                extra={"queue": self.queue.name, "messages": len(batch), "error": repr(exc)},
            )
        finally:
            self._batch_slots.release()
            for _, done in batch:
                if not done.done():
                    done.set_result(succeeded)

    async def _process(self, message: AbstractIncomingMessage) -> str:
        try:
            envelope = decode(message.body, self.payload_type)
        except MessageDecodeError as exc:
            return await self._park(message, "undecodable", exc)

        with correlation_scope(envelope.correlation_id):
            attempt = delivery_count(message) + 1
            try:
                await self.handler(envelope)
            except PoisonMessage as exc:
                return await self._park(message, "poison", exc)
            except Exception as exc:  # noqa: BLE001 - any failure is retried, then parked
                if attempt >= self.max_attempts:
                    return await self._park(message, "retries_exhausted", exc)
                delay = self.retry_backoff.delay(attempt)
                log.warning(
                    "handler failed, message will be redelivered",
                    extra={
                        "queue": self.queue.name,
                        "message_id": str(envelope.message_id),
                        "attempt": attempt,
                        "retry_in_s": delay,
                        "error": repr(exc),
                    },
                )
                await asyncio.sleep(delay)
                await self._requeue(message)
                return "retried"
            await self._ack(message)
            return "processed"

    async def _park(self, message: AbstractIncomingMessage, reason: str, exc: Exception) -> str:
        headers = dict(message.headers or {})
        headers.update(
            {
                "x-parked-reason": reason,
                "x-parked-error": repr(exc)[:1000],
                "x-parked-at": dt.datetime.now(dt.UTC).isoformat(),
                "x-parked-from-queue": self.queue.name,
                "x-original-routing-key": message.routing_key or "",
                "x-delivery-attempts": delivery_count(message) + 1,
            }
        )
        try:
            await self.broker.publisher.publish_message(
                republishable(message, headers),
                exchange=self.broker.topology.dead_letter_exchange,
                routing_key=self.queue.name,
            )
        except PublishError:
            log.exception("could not park message; it will be redelivered")
            await self._requeue(message)
            return "retried"
        log.error(
            "message parked",
            extra={"queue": self.queue.name, "message_id": message.message_id, "reason": reason},
        )
        await self._ack(message)
        return "parked"
