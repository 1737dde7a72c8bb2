"""Migrations run forward and back on an empty database and match the Core metadata."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.support import admin_execute, database_dsn

ROOT = Path(__file__).resolve().parents[2]
PLATFORM_SCHEMAS = {"payments", "webhooks", "reconciler", "gateway", "provider"}


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    name = f"test_empty_{uuid.uuid4().hex[:12]}"
    await admin_execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_dsn(name)
    finally:
        await admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alembic(dsn: str, *args: str) -> str:
    """Run the real `alembic` command, configured the way operators configure it."""
    env = {**os.environ, "DATABASE_URL": dsn}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


async def platform_tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT table_schema || '.' || table_name AS name FROM information_schema.tables"
            " WHERE table_schema = ANY($1::text[])",
            list(PLATFORM_SCHEMAS),
        )
        return {row["name"] for row in rows}
    finally:
        await conn.close()


async def platform_schemas(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT nspname FROM pg_namespace")
        return {row["nspname"] for row in rows} & PLATFORM_SCHEMAS
    finally:
        await conn.close()


EXPECTED_TABLES = {
    "payments.payment_stats",
    "webhooks.webhook_stats",
    "provider.charges",
    "provider.webhook_deliveries",
    "provider.refunds",
    "payments.refunds",
    "payments.payments",
    "payments.payment_events",
    "payments.inbox",
    "webhooks.webhook_events",
    "webhooks.inbox",
    "reconciler.reconciliation_logs",
    "reconciler.reconciliation_items",
    "reconciler.inbox",
    "gateway.idempotency_keys",
}


async def test_upgrade_downgrade_upgrade_on_an_empty_database(empty_database: str) -> None:
    alembic(empty_database, "upgrade", "head")
    assert await platform_tables(empty_database) >= EXPECTED_TABLES

    alembic(empty_database, "downgrade", "base")
    assert await platform_tables(empty_database) == set()
    assert await platform_schemas(empty_database) == set()

    alembic(empty_database, "upgrade", "head")
    assert await platform_tables(empty_database) >= EXPECTED_TABLES
    # The migrated schema is exactly what the Core metadata describes.
    assert "No new upgrade operations detected" in alembic(empty_database, "check")


async def test_updated_at_is_maintained_by_the_database(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        payment_id = uuid.uuid4()
        created = await conn.fetchrow(
            "INSERT INTO payments.payments (id, reference, amount_minor, currency, customer_id)"
            " VALUES ($1, 'PAY-T1', 100, 'USD', 'c1')"
            " RETURNING created_at, updated_at",
            payment_id,
        )
        assert created is not None
        # now() is the transaction's start, so a later transaction gets a later timestamp.
        updated = await conn.fetchval(
            "UPDATE payments.payments SET description = 'x' WHERE id = $1 RETURNING updated_at",
            payment_id,
        )
        assert updated > created["updated_at"]
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("column_values", "constraint"),
    [
        ("0, 'USD', 'c'", "ck_payments_amount_positive"),
        ("-5, 'USD', 'c'", "ck_payments_amount_positive"),
        ("100, 'usd', 'c'", "ck_payments_currency_iso4217"),
        ("100, 'USDX', 'c'", "ck_payments_currency_iso4217"),
        ("100, 'USD', ''", "ck_payments_customer_id_length"),
        (f"100, 'USD', '{'c' * 129}'", "ck_payments_customer_id_length"),
    ],
)
async def test_payment_constraints_refuse_bad_rows(
    database_url: str, column_values: str, constraint: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.CheckViolationError) as raised:
            await conn.execute(
                "INSERT INTO payments.payments (id, reference, amount_minor, currency, customer_id)"
                f" VALUES (gen_random_uuid(), 'PAY-X', {column_values})"
            )
        assert raised.value.constraint_name == constraint
    finally:
        await conn.close()
