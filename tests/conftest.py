"""Fixtures shared by every test layer.

Isolation: the session migrates one template database; every test that needs a
database gets its own copy (CREATE DATABASE ... TEMPLATE), dropped afterwards. The
session also creates its own RabbitMQ vhost, and every broker test declares the
topology under a fresh namespace inside it, so tests never see each other's messages
and never assume an empty server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config

from libs.common.broker.connection import Broker
from libs.common.broker.topology import Topology, delete
from libs.common.db import Database
from libs.common.settings import PaymentsSettings
from tests.support import admin_execute, database_dsn, fresh_vhost

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(dsn: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = "postgresql+asyncpg" + dsn.removeprefix("postgresql")
    return config


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    """A database at migration head, cloned by each test that needs one."""
    name = f"test_tpl_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        command.upgrade(alembic_config(database_dsn(name)), "head")
        yield name
    finally:
        asyncio.run(admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def database_url(template_database: str) -> AsyncIterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    await admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    try:
        yield database_dsn(name)
    finally:
        await admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def session_rabbitmq_url() -> Iterator[str]:
    """The URL of a vhost of this test session's own."""
    with fresh_vhost() as url:
        yield url


@pytest.fixture
def rabbitmq_url(session_rabbitmq_url: str) -> str:
    """In-process tests isolate by topology namespace inside the session's vhost."""
    return session_rabbitmq_url


@pytest.fixture
def settings(database_url: str, rabbitmq_url: str) -> PaymentsSettings:
    """Settings pointing at this test's database and the session's vhost."""
    return PaymentsSettings(
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        publish_timeout_seconds=2.0,
    )


@pytest.fixture
async def db(settings: PaymentsSettings) -> AsyncIterator[Database]:
    database = await Database.connect(settings)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def topology() -> Topology:
    return Topology(namespace=f"t{uuid.uuid4().hex[:12]}", delivery_limit=3)


@pytest.fixture
async def broker(settings: PaymentsSettings, topology: Topology) -> AsyncIterator[Broker]:
    broker = await Broker.connect(settings, name="tests", topology=topology)
    try:
        yield broker
    finally:
        if broker.is_connected:
            async with broker.connection.channel() as channel:
                await delete(channel, topology)
        await broker.close()
