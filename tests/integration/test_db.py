"""The pool retries a whole transaction when its connection dies, and nothing else."""

from __future__ import annotations

import asyncpg
import pytest

from libs.common.db import Connection, Database


async def test_transaction_is_rerun_on_a_fresh_connection_after_connection_loss(
    db: Database, database_url: str
) -> None:
    attempts: list[int] = []

    async def work(conn: Connection) -> int:
        attempts.append(await conn.fetchval("SELECT pg_backend_pid()"))
        await conn.execute(
            "INSERT INTO payments.inbox (consumer, message_id, message_type)"
            " VALUES ('t', gen_random_uuid(), 'test')"
        )
        if len(attempts) == 1:
            # Another session kills this one mid-transaction, as a server restart would.
            admin = await asyncpg.connect(database_url)
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", attempts[0])
            finally:
                await admin.close()
        return await conn.fetchval("SELECT count(*) FROM payments.inbox")

    count = await db.transaction(work)

    assert len(attempts) == 2
    assert attempts[0] != attempts[1]
    # The first attempt's insert died with its connection; only the second one committed.
    assert count == 1
    row = await db.fetchrow("SELECT count(*) AS n FROM payments.inbox")
    assert row is not None
    assert row["n"] == 1


async def test_errors_that_a_retry_cannot_fix_are_raised_at_once(db: Database) -> None:
    attempts = 0

    async def work(conn: Connection) -> None:
        nonlocal attempts
        attempts += 1
        await conn.execute("INSERT INTO payments.payments (id) VALUES (gen_random_uuid())")

    with pytest.raises(asyncpg.NotNullViolationError):
        await db.transaction(work)
    assert attempts == 1


async def test_retries_are_bounded(db: Database) -> None:
    attempts = 0

    async def work(conn: Connection) -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionResetError("the network is down")

    db.backoff_seconds = 0.001
    with pytest.raises(ConnectionResetError):
        await db.transaction(work)
    assert attempts == db.attempts
