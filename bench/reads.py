"""Scenario 5, reads: `GET /api/payments/stats` and `GET /api/payments` as payments pile up.

Payments are bulk-inserted through the table (`INSERT ... SELECT generate_series`), so
the triggers keep the stats counters exactly as they would in service, then the table
is vacuumed and analysed (as autovacuum would soon do). At each size, one request at a
time: the API through the gateway, against the plain SQL it stands for run straight on
the database from here (no HTTP, no JSON): for stats the aggregate a naive
implementation would run over the whole table, for a page the same keyset query.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import asyncpg

from bench.common import Context
from bench.harness import say
from bench.load import build_request, closed_loop, ms, percentile, same_request
from bench.report import Figure, ScenarioResult
from tools.launch import ROOT

CHUNK = 100_000
# The largest step, where the targets are checked; it needs this much free disk (the
# table, its indexes and the WAL of the inserts, with room to spare).
LARGEST = 10_000_000
LARGEST_NEEDS_BYTES = 20 * 2**30
PLAIN_AGGREGATE = (
    "SELECT status, currency, count(*), sum(amount_minor) FROM payments.payments GROUP BY 1, 2"
)
PLAIN_PAGE = """
SELECT id, reference, status, amount_minor, currency, customer_id, description, metadata,
       provider, provider_reference, failure_reason, created_at, updated_at
  FROM payments.payments {where} ORDER BY created_at DESC, id DESC LIMIT 21
"""
INSERT = """
INSERT INTO payments.payments
    (id, reference, amount_minor, currency, customer_id, description, status, metadata,
     created_at, updated_at)
SELECT gen_random_uuid(), 'BENCH-' || g, 100 + (g * 7919) % 100000,
       (ARRAY['USD', 'EUR', 'GBP', 'JPY'])[1 + g % 4], 'cust_' || (g % 5000), 'bench payment',
       (ARRAY['completed', 'completed', 'completed', 'failed', 'processing', 'pending',
              'refunded'])[1 + g % 7],
       '{}'::jsonb,
       now() - make_interval(secs => (g * 2654435761) % 2592000),
       now() - make_interval(secs => (g * 2654435761) % 2592000)
  FROM generate_series($1::bigint, $2::bigint) AS g
"""


STATS_SIZE = "SELECT pg_relation_size('payments.payment_stats')"


async def _grow(conn: asyncpg.Connection[Any], have: int, want: int) -> dict[str, Any]:
    """Insert payments up to `want`, then vacuum as autovacuum would.

    Each chunk is one statement; the statement-level triggers add its rows up and update
    each counter once. The vacuum that follows (of the counters too) leaves the tables as
    autovacuum would after many small transactions.
    """
    started = time.perf_counter()
    for low in range(have + 1, want + 1, CHUNK):
        await conn.execute(INSERT, low, min(want, low + CHUNK - 1))
    inserted = time.perf_counter() - started
    counters_before = await conn.fetchval(STATS_SIZE)
    await conn.execute("VACUUM ANALYZE payments.payments, payments.payment_stats")
    return {
        "insert_s": round(inserted, 1),
        "vacuum_s": round(time.perf_counter() - started - inserted, 1),
        "payment_stats_bytes_before_vacuum": counters_before,
        "payment_stats_bytes_after_vacuum": await conn.fetchval(STATS_SIZE),
    }


async def _sql_latencies(
    conn: asyncpg.Connection[Any], sql: str, *, count: int, budget_s: float
) -> list[float]:
    await conn.fetch(sql)
    latencies: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(latencies) < count and (len(latencies) < 10 or time.perf_counter() < deadline):
        started = time.perf_counter()
        await conn.fetch(sql)
        latencies.append(time.perf_counter() - started)
    return latencies


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "reads", "stats and list endpoints at growing table sizes vs the plain SQL"
    )
    sizes = ctx.size([10_000, 100_000, 1_000_000, LARGEST], [10_000])
    free = shutil.disk_usage(ROOT).free
    if LARGEST in sizes and free < LARGEST_NEEDS_BYTES:
        # Bounded in disk: the largest step is left out, and the details say why.
        sizes.remove(LARGEST)
        result.details["skipped"] = f"{LARGEST} payments: {free // 2**30} GiB free"
    requests = ctx.size(300, 100)
    stack = await ctx.harness.stack("reads")
    try:
        gateway = await stack.start_service("gateway")
        conn = await stack.connect()
        try:
            have = 0
            for size in sizes:
                grown = await _grow(conn, have, size)
                have = size
                say(f"reads: {size} payments ({grown})")
                label = f"{size // 1000}k" if size < 1_000_000 else f"{size // 1_000_000}M"
                at_target = size == sizes[-1] and not ctx.quick
                endpoints = {
                    "stats": ("/api/payments/stats", PLAIN_AGGREGATE),
                    "list": ("/api/payments", PLAIN_PAGE.format(where="")),
                    "list?status": (
                        "/api/payments?status=failed",
                        PLAIN_PAGE.format(where="WHERE status = 'failed'"),
                    ),
                }
                details: dict[str, Any] = {"growth": grown}
                for name, (path, sql) in endpoints.items():
                    request = same_request(build_request("GET", path, port=gateway.port))
                    await closed_loop(gateway.port, request, concurrency=1, count=10)
                    load = await closed_loop(gateway.port, request, concurrency=1, count=requests)
                    plain = await _sql_latencies(conn, sql, count=requests, budget_s=15.0)
                    api = load.latencies(200)
                    details[name] = {
                        "api": load.summary(200),
                        "plain_sql": {
                            "runs": len(plain),
                            "p50_ms": ms(percentile(plain, 0.5)),
                            "p99_ms": ms(percentile(plain, 0.99)),
                        },
                    }
                    for q_name, q in (("p50", 0.5), ("p99", 0.99)):
                        target: dict[str, Any] = {}
                        if at_target and q_name == "p99":
                            target = {"target": "< 10", "target_on": "value"}
                        elif name == "stats" and at_target and q_name == "p50":
                            target = {"target": "<= 0.05"}
                        result.add(
                            Figure(
                                f"GET {path.removeprefix('/api')} {q_name} at {label}",
                                ms(percentile(api, q)),
                                "ms",
                                "plain aggregate" if name == "stats" else "plain page query",
                                ms(percentile(plain, q)),
                                better="lower",
                                **target,
                            )
                        )
                result.details[label] = details
        finally:
            await conn.close()
    finally:
        await ctx.harness.release(stack)
    return result
