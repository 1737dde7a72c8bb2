"""A robust connection that moves to the next node of a cluster when it loses one.

aio-pika's robust connection reconnects, and restores channels, QoS, queues and
consumers, but only ever to the one URL it was given (aio-pika issue 141). Given the
URLs of several cluster nodes, this one moves to the next node each time a connection
ends or an attempt fails, so losing a node costs one reconnect instead of waiting for
that node to come back. Everything else is aio-pika's: the restore, the reconnect
interval, and the first connection failing fast.

aio-pika calls `_on_connection_close` both when an open connection closes and when an
attempt to open one fails (aio_pika.abc.UnderlayConnection.connect), and reads `url`
for every attempt: those two are the whole of what this class changes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from yarl import URL

log = logging.getLogger(__name__)


class FailoverConnection(aio_pika.RobustConnection):
    """A RobustConnection over several node URLs, starting at `urls[first]`."""

    def __init__(self, urls: Sequence[URL], *, first: int = 0, **kwargs: Any) -> None:
        if not urls:
            raise ValueError("no RabbitMQ URL given")
        # aio-pika reads its options (reconnect interval, ...) from the first URL's query
        # once, here; every node's URL carries the same ones (see connect_failover).
        super().__init__(urls[first % len(urls)], **kwargs)
        self.urls = list(urls)
        self.node = first % len(self.urls)

    def next_node(self) -> None:
        self.node = (self.node + 1) % len(self.urls)
        self.url = self.urls[self.node]

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if len(self.urls) > 1 and not self.close_called:
            previous = str(self)
            self.next_node()
            log.warning(
                "RabbitMQ node lost or unreachable, moving to the next one",
                extra={"from_node": previous, "to_node": str(self)},
            )
        await super()._on_connection_close(closing)


async def connect_failover(
    urls: Sequence[str],
    *,
    attempt_seconds: float,
    client_properties: dict[str, Any] | None = None,
    shuffle: bool = True,
    **options: Any,
) -> AbstractRobustConnection:
    """Connect to the first node of `urls` that answers, then fail over between them all.

    `options` go into every URL's query the way aio_pika.connect_robust puts its keyword
    arguments there (heartbeat=..., reconnect_interval=...). With `shuffle`, each process
    starts at a node of its own, so that a cluster's connections (and the queue leaders
    that declarations place on the declaring client's node) spread over its nodes. One
    URL behaves like `aio_pika.connect_robust` with it; each attempt gets
    `attempt_seconds`.
    """
    if not urls:
        raise ValueError("no RabbitMQ URL given")
    nodes = [make_url(url, **options) for url in urls]
    start = random.randrange(len(nodes)) if shuffle else 0  # noqa: S311 - spreading load, not security
    last: BaseException = ConnectionError("no RabbitMQ node answered")
    for attempt in range(len(nodes)):
        first = (start + attempt) % len(nodes)
        connection = FailoverConnection(
            nodes, first=first, client_properties=client_properties or {}
        )
        try:
            await connection.connect(timeout=attempt_seconds)
        except (aio_pika.exceptions.AMQPError, OSError, TimeoutError) as exc:
            # An unreachable node is skipped; what is wrong everywhere (credentials, a
            # vhost) fails on each node and is raised from the last.
            last = exc
            await connection.close()
            log.warning(
                "RabbitMQ node unreachable at start",
                extra={"node": str(connection), "error": repr(exc)},
            )
            continue
        return connection
    raise last
