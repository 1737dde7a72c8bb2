"""Acks of one channel's deliveries, in as few frames as is safe.

One `basic.ack` with `multiple` settles every delivery up to its tag. A consumer's
messages finish out of order (batches in flight side by side, messages retried on their
own), so a multiple ack may cover only deliveries that are all finished. `AckLedger`
keeps the channel's deliveries in tag order: below the first one still in work (the
watermark) everything finished is acked by one multiple ack; what finished above it is
acked singly, so nothing waits on a slow message below it. `ChannelAcks` sends what the
ledger plans once per turn of the event loop, so the messages of a batch, which all
finish in the same turn, share one frame.

Delivery tags belong to one channel: after a reconnect the broker has taken back every
unacked delivery of the old channel (they are redelivered), and the new channel counts
from 1 again. Each channel gets its own ledger, and an ack meant for a closed channel
fails as `message.ack()` would.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum

import aiormq.abc


class _State(enum.Enum):
    IN_WORK = enum.auto()
    FINISHED = enum.auto()  # to be acked
    SETTLED = enum.auto()  # acked or nacked by a frame of its own


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    tag: int
    multiple: bool


class AckLedger:
    """Which deliveries of a channel are finished, and the fewest acks that settle them."""

    def __init__(self) -> None:
        self._tags: collections.deque[int] = collections.deque()  # not yet acked, in order
        self._states: dict[int, _State] = {}

    def delivered(self, tag: int) -> None:
        if self._tags and tag <= self._tags[-1]:
            raise ValueError(f"delivery tag {tag} after {self._tags[-1]}: tags only grow")
        self._tags.append(tag)
        self._states[tag] = _State.IN_WORK

    def finished(self, tag: int) -> None:
        """`tag` is done and wants its ack (sent by the next `plan`)."""
        self._expect_in_work(tag)
        self._states[tag] = _State.FINISHED

    def settled(self, tag: int) -> None:
        """`tag` was settled by a frame of its own (a nack): no ack may name it."""
        self._expect_in_work(tag)
        self._states[tag] = _State.SETTLED

    def _expect_in_work(self, tag: int) -> None:
        state = self._states.get(tag)
        if state is not _State.IN_WORK:
            raise ValueError(f"delivery tag {tag} is {state and state.name.lower()}, not in work")

    def plan(self) -> tuple[list[Ack], list[int]]:
        """The acks to send now, and the tags they settle."""
        acks: list[Ack] = []
        acked: list[int] = []
        top: int | None = None
        while self._tags and self._states[self._tags[0]] is not _State.IN_WORK:
            tag = self._tags.popleft()
            if self._states.pop(tag) is _State.FINISHED:
                acked.append(tag)
                top = tag
        if top is not None:
            # Everything below `top` is acked by now, or was settled on its own: the
            # broker skips those. The tag a multiple ack names must itself be unacked.
            acks.append(Ack(top, multiple=True))
        for tag in self._tags:
            if self._states[tag] is _State.FINISHED:
                acks.append(Ack(tag, multiple=False))
                acked.append(tag)
                self._states[tag] = _State.SETTLED
        return acks, acked

    def __len__(self) -> int:
        return len(self._tags)


class ChannelAcks:
    """The ledger of one AMQP channel, and the frames it plans sent on that channel."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self.ledger = AckLedger()
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._flush: asyncio.Task[None] | None = None
        # One flush plans and writes at a time. Two interleaved would reorder frames: a
        # later plan's multiple ack can cover a tag whose single ack an earlier plan has
        # not written yet, and that single ack then names a settled tag.
        self._writing = asyncio.Lock()

    def delivered(self, tag: int) -> None:
        self.ledger.delivered(tag)

    async def ack(self, tag: int) -> None:
        """Return once the ack that settles `tag` is written (or raise why it was not)."""
        self.ledger.finished(tag)
        done = self._waiting[tag] = asyncio.get_running_loop().create_future()
        if self._flush is None:
            # A task starts after whatever is ready to run now: the rest of the batch.
            self._flush = asyncio.create_task(self._send(), name="acks")
        await done

    async def nack(self, tag: int, *, requeue: bool = True) -> None:
        # Between flushes: a multiple ack written before the nack would ack it instead.
        async with self._writing:
            self.ledger.settled(tag)
            await self.channel.basic_nack(tag, requeue=requeue)

    async def _send(self) -> None:
        self._flush = None  # acks from now on wait for the next flush
        async with self._writing:
            acks, acked = self.ledger.plan()
            waiting = [self._waiting.pop(tag) for tag in acked]
            try:
                for ack in acks:
                    await self.channel.basic_ack(ack.tag, multiple=ack.multiple)
            except Exception as exc:  # noqa: BLE001 - handed to each message's ack, as aio-pika would
                for done in waiting:
                    if not done.done():
                        done.set_exception(exc)
                return
        for done in waiting:
            if not done.done():
                done.set_result(None)
