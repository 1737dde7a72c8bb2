"""The stats counters (statement-level triggers, migrations 0005, 0006) under big statements."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg

from libs.common.db import Connection, Database
from libs.common.state_machine import TransitionRequest, apply_transitions
from libs.common.states import PaymentStatus, TransitionSource

P = PaymentStatus


async def insert_payments(conn: Connection, n: int, *, seed: int) -> list[uuid.UUID]:
    rng = random.Random(seed)
    ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(n)]
    await conn.execute(
        """
        INSERT INTO payments.payments (id, reference, amount_minor, currency, customer_id)
        SELECT id, 'PAY-' || id::text, amount, currency, 'c'
          FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS t(id, amount, currency)
        """,
        ids,
        [rng.randint(1, 100_000) for _ in ids],
        [rng.choice(["USD", "EUR", "JPY"]) for _ in ids],
    )
    return ids


async def counters_match_the_table(conn: Connection) -> None:
    truth = await conn.fetch(
        "SELECT status, currency, count(*) AS n, sum(amount_minor) AS amount"
        " FROM payments.payments GROUP BY 1, 2 ORDER BY 1, 2"
    )
    counted = await conn.fetch(
        "SELECT status, currency, sum(count) AS n, sum(amount_minor) AS amount"
        " FROM payments.payment_stats GROUP BY 1, 2 HAVING sum(count) <> 0 ORDER BY 1, 2"
    )
    assert [tuple(r) for r in counted] == [tuple(r) for r in truth]


async def test_many_row_statements_keep_the_counters_exact(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        ids = await insert_payments(conn, 300, seed=1)
        await counters_match_the_table(conn)
        # One statement moving rows between statuses, currencies and amounts at once.
        await conn.execute(
            """
            UPDATE payments.payments
               SET status = CASE WHEN amount_minor % 3 = 0 THEN 'completed' ELSE status END,
                   currency = CASE WHEN amount_minor % 5 = 0 THEN 'EUR' ELSE currency END,
                   amount_minor = amount_minor + (amount_minor % 2)
             WHERE id = ANY($1::uuid[])
            """,
            ids[:200],
        )
        await counters_match_the_table(conn)
        # An update that moves no counter, and one that touches no row.
        await conn.execute("UPDATE payments.payments SET description = 'x'")
        await conn.execute("UPDATE payments.payments SET status = 'failed' WHERE false")
        await counters_match_the_table(conn)
        await conn.execute("DELETE FROM payments.payments WHERE id = ANY($1::uuid[])", ids[::3])
        await counters_match_the_table(conn)
    finally:
        await conn.close()


async def test_a_connection_counts_into_one_slot(database_url: str) -> None:
    """Statements from one connection share its counter rows, not one row per payment,
    so concurrent writers on other connections seldom wait on them."""
    conn = await asyncpg.connect(database_url)
    try:
        ids = await insert_payments(conn, 300, seed=3)
        await conn.execute(
            "UPDATE payments.payments SET status = 'processing' WHERE id = ANY($1::uuid[])", ids
        )
        rows = await conn.fetch(
            "SELECT status, currency, count(*) AS slots FROM payments.payment_stats"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        )
        assert {(r["status"], r["currency"]) for r in rows} == {
            (status, currency)
            for status in ("pending", "processing")
            for currency in ("EUR", "JPY", "USD")
        }
        assert all(r["slots"] == 1 for r in rows)
        await counters_match_the_table(conn)
    finally:
        await conn.close()


async def test_concurrent_many_row_statements_do_not_deadlock_on_the_counters(
    db: Database,
) -> None:
    """Eight transactions at once, each inserting 40 payments and then moving them.

    Their payments differ but may share counter rows (16 slots per status and currency).
    Without retries: a deadlock would surface as an error here."""

    async def batch(number: int) -> None:
        async with db.pool.acquire() as conn, conn.transaction():
            ids = await insert_payments(conn, 40, seed=100 + number)
            await apply_transitions(
                conn, [TransitionRequest(i, P.PROCESSING, TransitionSource.PROVIDER) for i in ids]
            )
            await apply_transitions(
                conn, [TransitionRequest(i, P.COMPLETED, TransitionSource.WEBHOOK) for i in ids]
            )

    for _ in range(3):
        await asyncio.gather(*(batch(n) for n in range(8)))
        async with db.pool.acquire() as conn:
            await conn.execute("DELETE FROM payments.payments")

    async with db.pool.acquire() as conn:
        await insert_payments(conn, 10, seed=1)
        await counters_match_the_table(conn)


async def test_concurrent_batches_over_the_same_payments_apply_each_move_once(
    db: Database, database_url: str
) -> None:
    """Eight batches at once, each moving the same 60 payments, listed in its own order."""
    conn = await asyncpg.connect(database_url)
    try:
        ids = await insert_payments(conn, 60, seed=2)
    finally:
        await conn.close()
    targets = [P.PROCESSING, P.COMPLETED, P.FAILED, P.PROCESSING] * 2

    async def batch(number: int, target: PaymentStatus) -> dict[uuid.UUID, bool]:
        order = random.Random(number).sample(ids, len(ids))
        requests = [TransitionRequest(i, target, TransitionSource.WEBHOOK) for i in order]
        async with db.pool.acquire() as conn, conn.transaction():
            return {t.payment_id: t.applied for t in await apply_transitions(conn, requests)}

    results = await asyncio.gather(*(batch(n, t) for n, t in enumerate(targets)))

    # Each payment went through at most pending -> processing -> a final status.
    applied_per_payment = [sum(r[i] for r in results) for i in ids]
    assert all(1 <= n <= 2 for n in applied_per_payment)
    conn = await asyncpg.connect(database_url)
    try:
        audited = await conn.fetchval(
            "SELECT count(*) FROM payments.payment_events WHERE payment_id = ANY($1::uuid[])", ids
        )
        assert audited == len(ids) * len(targets)
        await counters_match_the_table(conn)
    finally:
        await conn.close()
