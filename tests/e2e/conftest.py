"""Fixtures for end-to-end tests: real service processes on a vhost of the test's own.

The services use the default topology, so each test gets a fresh vhost: nothing a
failed test left in a queue reaches the next one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.e2e.processes import running_services
from tests.e2e.stack import Stack
from tests.support import fresh_vhost


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    with fresh_vhost() as url:
        yield url


@pytest.fixture
def stack(database_url: str, rabbitmq_url: str, tmp_path: Path) -> Iterator[Stack]:
    """Services started with `await stack.start(name)`; all stopped after the test."""
    with running_services(tmp_path) as services:
        yield Stack(database_url, rabbitmq_url, tmp_path, services)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A plain connection to the test's database, to look at what the services wrote."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()
