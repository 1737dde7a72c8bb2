"""Helpers for tests: polling, free ports, and the real PostgreSQL/RabbitMQ they run on."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar
from urllib.parse import quote

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

# The launcher's, re-exported: one way to pick a port for everything this repository starts.
from tools.launch import free_port as free_port

T = TypeVar("T")

# The servers this machine (and CI) runs; override to point the suite elsewhere.
PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBITMQ_BASE_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def database_dsn(name: str) -> str:
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name


async def admin_execute(*statements: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "--quiet", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def fresh_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of its own, removed afterwards; yields its URL."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield RABBITMQ_BASE_URL.rstrip("/") + "/" + quote(name, safe="")
    finally:
        rabbitmqctl("delete_vhost", name)


async def messages_consumed(url: str, queue: str) -> int:
    """How many messages of `queue` the service at `url` has finished with (acked,
    requeued or parked), from its /metrics: a drain for a service run as a process."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        int(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "messages_consumed_total" and sample.labels.get("queue") == queue
    )


async def eventually(
    check: Callable[[], Awaitable[T] | T], *, within: float = 10.0, interval: float = 0.05
) -> T:
    """Call (and await) `check` until it returns a truthy value; fail with its last answer."""
    deadline = time.monotonic() + within
    while True:
        answer = check()
        result = await answer if inspect.isawaitable(answer) else answer
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s (last: {result!r})")
        await asyncio.sleep(interval)
