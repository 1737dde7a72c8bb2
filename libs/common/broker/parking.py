"""Operating the parking queues: list, show, replay and purge parked messages.

A parked message keeps its body, its message id and every header, plus why it was
parked (`x-parked-reason`, `x-parked-error`, or the broker's `x-death` when the delivery
limit parked it). Replaying republishes it, confirmed, to the exchange and routing key it
first came through, and only then removes it from the parking queue; so a crash
mid-replay can at worst replay it twice, which the consumers' inboxes make harmless.

Reading a queue means taking its messages; listing takes them all, then gives every one
back unacknowledged, so the queue is unchanged afterwards.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from libs.common.broker.connection import Broker
from libs.common.broker.publisher import republishable
from libs.common.broker.topology import QueueSpec

MAX_LISTED = 1000
# Headers about the parking itself, left behind when a message is replayed.
_PARKING_HEADERS = (
    "x-parked",
    "x-death",
    "x-first-death",
    "x-last-death",
    "x-delivery-count",
    "x-delivery-attempts",
    "x-original-routing-key",
)


@dataclasses.dataclass(frozen=True, slots=True)
class ParkedMessage:
    queue: str
    message_id: str | None
    type: str | None
    routing_key: str
    reason: str
    error: str | None
    parked_at: str | None
    attempts: int | None
    headers: dict[str, Any]
    body: bytes

    @classmethod
    def of(cls, queue: QueueSpec, message: AbstractIncomingMessage) -> ParkedMessage:
        headers: dict[str, Any] = dict(message.headers or {})
        deaths = headers.get("x-death") or []
        first_death = deaths[0] if isinstance(deaths, list) and deaths else {}
        routing_key = headers.get("x-original-routing-key") or _first_routing_key(first_death)
        return cls(
            queue=queue.name,
            message_id=message.message_id,
            type=message.type,
            routing_key=str(routing_key or (queue.routing_keys[0] if queue.routing_keys else "")),
            reason=str(headers.get("x-parked-reason") or headers.get("x-first-death-reason") or ""),
            error=_text(headers.get("x-parked-error")),
            parked_at=_text(headers.get("x-parked-at")),
            attempts=_int(headers.get("x-delivery-attempts") or first_death.get("count")),
            headers={k: _plain(v) for k, v in headers.items()},
            body=message.body,
        )


def _first_routing_key(death: Any) -> str | None:
    keys = death.get("routing-keys") if isinstance(death, dict) else None
    return str(keys[0]) if keys else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _plain(value: Any) -> Any:
    """Header values as JSON-friendly data."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class ParkingLot:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def queues(self) -> tuple[QueueSpec, ...]:
        return self.broker.topology.queues

    def queue(self, name: str) -> QueueSpec:
        """A consumer queue by its name, or its short name (payment-requested)."""
        for spec in self.queues():
            if name in (spec.name, spec.parking, spec.name.split(".", 1)[-1]):
                return spec
        known = ", ".join(spec.name for spec in self.queues())
        raise LookupError(f"no queue {name!r}; the queues are {known}")

    async def browse(self, queue: QueueSpec, limit: int = MAX_LISTED) -> list[ParkedMessage]:
        return await self._visit(queue, lambda _: False, limit)

    async def show(self, queue: QueueSpec, message_id: str) -> ParkedMessage | None:
        found = await self._visit(queue, lambda m: m.message_id == message_id, MAX_LISTED)
        matching = [m for m in found if m.message_id == message_id]
        return matching[0] if matching else None

    async def replay(self, queue: QueueSpec, message_id: str | None = None) -> int:
        """Republish parked messages (one, or all) to where they came from; how many."""
        return await self._take(queue, message_id, republish=True)

    async def purge(self, queue: QueueSpec, message_id: str | None = None) -> int:
        """Delete parked messages (one, or all) for good; how many."""
        return await self._take(queue, message_id, republish=False)

    async def _visit(
        self, queue: QueueSpec, stop: Callable[[ParkedMessage], bool], limit: int
    ) -> list[ParkedMessage]:
        seen: list[ParkedMessage] = []
        async with self.broker.connection.channel() as channel:
            parking = await channel.get_queue(queue.parking)
            # Closing the channel gives back every message taken and not acked.
            while len(seen) < limit and (message := await parking.get(fail=False)) is not None:
                seen.append(ParkedMessage.of(queue, message))
                if stop(seen[-1]):
                    break
        return seen

    async def _take(self, queue: QueueSpec, message_id: str | None, *, republish: bool) -> int:
        taken = 0
        async with self.broker.connection.channel() as channel:
            parking = await channel.get_queue(queue.parking)
            for _ in range(MAX_LISTED * 100):
                message = await parking.get(fail=False)
                if message is None:
                    break
                if message_id is not None and message.message_id != message_id:
                    continue  # given back when the channel closes
                if republish:
                    await self._republish(channel, queue, message)
                await message.ack()
                taken += 1
                if message_id is not None:
                    break
        return taken

    async def _republish(
        self, channel: AbstractChannel, queue: QueueSpec, message: AbstractIncomingMessage
    ) -> None:
        parked = ParkedMessage.of(queue, message)
        headers: dict[str, Any] = {
            k: v for k, v in (message.headers or {}).items() if not k.startswith(_PARKING_HEADERS)
        }
        headers["x-replayed"] = int(headers.get("x-replayed") or 0) + 1
        await self.broker.publisher.publish_message(
            republishable(message, headers),
            exchange=self.broker.topology.exchange,
            routing_key=parked.routing_key,
        )
