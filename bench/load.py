"""HTTP load on 127.0.0.1: closed loop (fixed concurrency) and open loop (fixed arrival rate).

The client is a bare HTTP/1.1 keep-alive client over asyncio protocols, sending
pre-built request bytes and reading `Content-Length` bodies: a few microseconds of CPU
per request, so on a 2-core machine shared with the servers it takes as little as
possible from what it measures. Both the subject and its baseline are driven by the
same client, so whatever it costs cancels out in the ratio.

Open loop: request i is due at start + i/rate whatever happened to the others, and its
latency counts from when it was due, so a server that falls behind shows it in the
percentiles instead of slowing the load down (no coordinated omission).

Every load is bounded by a request count, a duration, or both. While one runs, the
client's garbage collector is off (see `client_never_pauses`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

Requests = Callable[[int], bytes]


def build_request(
    method: str,
    path: str,
    *,
    port: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def same_request(request: bytes) -> Requests:
    return lambda _: request


def each_request(requests: Sequence[bytes]) -> Requests:
    return lambda i: requests[i % len(requests)]


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def _complete(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buffer[:end]).lower()
        marker = head.find(b"\r\ncontent-length:")
        if marker < 0:
            waiter.set_exception(ValueError("response without Content-Length"))
            return
        line_end = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : line_end if line_end >= 0 else None])
        total = end + 4 + length
        if len(self._buffer) < total:
            return
        body = bytes(self._buffer[end + 4 : total])
        del self._buffer[:total]
        waiter.set_result((int(head[9:12]), body))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.closed or self.transport is None:
            raise ConnectionError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
    return protocol


@dataclass
class Sample:
    sent_at: float  # wall clock (time.time()) when it was sent, or due in an open loop
    latency: float  # seconds
    status: int  # 0 when the request failed without an answer
    body: bytes = b""


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    started: float = 0.0  # wall clock
    elapsed: float = 0.0  # seconds from the first send to the last answer
    errors: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.samples)

    @property
    def statuses(self) -> dict[int, int]:
        return dict(collections.Counter(s.status for s in self.samples))

    def ok(self, status: int) -> list[Sample]:
        return [s for s in self.samples if s.status == status]

    def rate(self, status: int | None = None) -> float:
        n = self.count if status is None else len(self.ok(status))
        return n / self.elapsed if self.elapsed > 0 else 0.0

    def latencies(self, status: int | None = None) -> list[float]:
        return [s.latency for s in self.samples if status is None or s.status == status]

    def summary(self, status: int) -> dict[str, Any]:
        lat = self.latencies(status)
        return {
            "requests": self.count,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "elapsed_s": round(self.elapsed, 3),
            "rate_per_s": round(self.rate(status), 1),
            "p50_ms": ms(percentile(lat, 0.50)),
            "p99_ms": ms(percentile(lat, 0.99)),
            "max_ms": ms(max(lat) if lat else None),
            "errors": self.errors[:5],
        }


class Disturbed(ConnectionError):
    """A load got answers that only something outside explains (the broker restarted).

    A ConnectionError, so the run tries the scenario once more (see bench.__main__).
    """


def require(load: LoadResult, status: int, what: str) -> LoadResult:
    """`load`, unless some answers were not `status`: then the measurement is void."""
    others = load.count - len(load.ok(status))
    if others:
        raise Disturbed(
            f"{what}: {others} of {load.count} answers were not {status} ({load.statuses};"
            f" {load.errors[:3]}); the machine's broker or database was probably restarted"
        )
    return load


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


_P = ParamSpec("_P")
_R = TypeVar("_R")
_loads_running = 0


def client_never_pauses(load: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    """Run `load` with the client's garbage collector off, on again after the last load.

    A full collection in this process walks all that the bench has imported and built,
    and stops the client for 25-55 ms: nothing is sent, nothing is read. An open loop
    counts that as the server's latency. In a 10 s load at 1,650/s, each cluster of
    answers slower than 20 ms began at one of the client's own collections, and the
    gateway's p99 moved between 3.4 and 22 ms with them. Loads are bounded, so what they
    leave for the collector waits until they end.
    """

    @functools.wraps(load)
    async def without_pauses(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        global _loads_running
        if _loads_running == 0:
            gc.collect()  # before the load's clock starts, not during it
            gc.disable()
        _loads_running += 1
        try:
            return await load(*args, **kwargs)
        finally:
            _loads_running -= 1
            if _loads_running == 0:
                gc.enable()

    return without_pauses


@client_never_pauses
async def closed_loop(
    port: int,
    requests: Requests,
    *,
    concurrency: int,
    duration: float | None = None,
    count: int | None = None,
    keep_bodies: bool = False,
    request_timeout: float = 30.0,
) -> LoadResult:
    """`concurrency` connections, each sending its next request as soon as it has an answer.

    Stops after `count` requests or `duration` seconds (whichever first); at least one
    of the two must be given.
    """
    if duration is None and count is None:
        raise ValueError("a load needs a count or a duration")
    result = LoadResult(started=time.time())
    started = time.perf_counter()
    deadline = started + duration if duration is not None else float("inf")
    next_index = 0
    last_answer = started

    async def worker() -> None:
        nonlocal next_index, last_answer
        connection: _Connection | None = None
        try:
            while time.perf_counter() < deadline and (count is None or next_index < count):
                index = next_index
                next_index += 1
                data = requests(index)
                sent_wall, sent = time.time(), time.perf_counter()
                try:
                    if connection is None or connection.closed:
                        connection = await _connect(port)
                    status, body = await asyncio.wait_for(connection.request(data), request_timeout)
                except (OSError, TimeoutError, ValueError) as exc:
                    status, body = 0, b""
                    result.errors.append(repr(exc))
                    if connection is not None:
                        connection.close()
                    connection = None
                now = time.perf_counter()
                last_answer = max(last_answer, now)
                result.samples.append(
                    Sample(sent_wall, now - sent, status, body if keep_bodies else b"")
                )
        finally:
            if connection is not None:
                connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = last_answer - started
    return result


@client_never_pauses
async def open_loop(
    port: int,
    requests: Requests,
    *,
    rate: float,
    duration: float,
    max_connections: int = 256,
    keep_bodies: bool = False,
    request_timeout: float = 30.0,
) -> LoadResult:
    """Request i is due at start + i/rate for `duration` seconds, on up to `max_connections`.

    Latency counts from when a request was due, including any wait for a free connection.
    """
    total = max(1, int(rate * duration))
    result = LoadResult(started=time.time())
    idle: list[_Connection] = []
    opened = 0
    freed = asyncio.Condition()
    started_wall, started = time.time(), time.perf_counter()
    last_answer = started

    async def take() -> _Connection:
        nonlocal opened
        async with freed:
            while True:
                while idle:
                    connection = idle.pop()
                    if not connection.closed:
                        return connection
                    opened -= 1
                if opened < max_connections:
                    opened += 1
                    break
                await freed.wait()
        try:
            return await _connect(port)
        except OSError:
            async with freed:
                opened -= 1
                freed.notify()
            raise

    async def give_back(connection: _Connection | None) -> None:
        nonlocal opened
        async with freed:
            if connection is not None and not connection.closed:
                idle.append(connection)
            else:
                opened -= 1
            freed.notify()

    async def one(index: int, due: float) -> None:
        nonlocal last_answer
        connection: _Connection | None = None
        try:
            connection = await take()
            status, body = await asyncio.wait_for(
                connection.request(requests(index)), request_timeout
            )
        except (OSError, TimeoutError, ValueError) as exc:
            status, body = 0, b""
            result.errors.append(repr(exc))
            if connection is not None:
                connection.close()
                connection = None
        now = time.perf_counter()
        last_answer = max(last_answer, now)
        result.samples.append(
            Sample(started_wall + (due - started), now - due, status, body if keep_bodies else b"")
        )
        await give_back(connection)

    tasks: list[asyncio.Task[None]] = []
    for index in range(total):
        due = started + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, due)))
    await asyncio.gather(*tasks)
    async with freed:
        for connection in idle:
            connection.close()
    result.elapsed = last_answer - started
    return result
