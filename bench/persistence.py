"""Scenario 2, persistence: a backlog of payment.requested drained by the payments service.

N messages are published (confirmed) while nothing consumes them; then the consumer
starts and the clock runs from its first database write to its last: for the payments
service, from the first payment stored to the last one recorded `processing` (stored
and charged at the simulated provider, whose charges are made not to settle during
the run); for the baseline, the minimal consumer's first and last row. Database
timestamps, so start-up time is not counted and polling does not blur the end.
The baseline runs before and after the service; the ratio is to their mean.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import Context, create_sink, publish_payments, wait_until
from bench.harness import Stack
from bench.report import Figure, ScenarioResult

# Charges stay `processing`: no webhook or settlement competes for the CPU.
NO_SETTLEMENT = {"PROVIDER_WEBHOOK_DELAY_MS": "3600000"}


PROCESSING_COUNT = (
    "SELECT coalesce(sum(count), 0) FROM payments.payment_stats WHERE status = 'processing'"
)


async def baseline_rate(stack: Stack, n: int, *, replicas: int = 1) -> dict[str, Any]:
    """The minimal consumer's rows per second over a backlog of `n` messages."""
    await create_sink(stack)
    await publish_payments(stack, n)
    consumers = [
        await stack.start_baseline("consume", "--queue", "payment-requested")
        for _ in range(replicas)
    ]
    cpu_before = stack.cpu()
    conn = await stack.connect()
    try:

        async def done() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM bench_sink") >= n)

        await wait_until(done, within=60 + n / 50, what="minimal consumer")
        row = await conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM max(at) - min(at)) AS span FROM bench_sink"
        )
    finally:
        await conn.close()
    cpu = stack.cpu_ms_per(cpu_before, stack.cpu(), n)
    await stack.stop(*consumers)
    if row is None:
        raise RuntimeError("no rows from the minimal consumer")
    span = float(row["span"] or 0)
    return {
        "messages": n,
        "span_s": round(span, 3),
        "rate_per_s": round(n / span, 1) if span else None,
        "cpu_ms_per_message": cpu,
    }


async def service_rate(
    ctx: Context, stack: Stack, n: int, *, replicas: int = 1, label: str = "payments"
) -> dict[str, Any]:
    """The payments service's payments stored and charged per second over a backlog of `n`."""
    conn = await stack.connect()
    try:
        before = await conn.fetchval("SELECT count(*) FROM payments.payments")
        ids = await publish_payments(stack, n)
        first_new = await conn.fetchval("SELECT coalesce(max(id), 0) FROM payments.payment_events")
        # Polled from the stats counters: a lookup of all n ids four times a second would
        # take PostgreSQL's CPU from the service measured. The end is checked exactly below.
        charged_before = await conn.fetchval(PROCESSING_COUNT)
        services = [await stack.start_service("payments") for _ in range(replicas)]
        cpu_before = stack.cpu()

        async def done() -> bool:
            return bool(await conn.fetchval(PROCESSING_COUNT) - charged_before >= n)

        await wait_until(done, within=120 + n / 10, what="payments service", interval=0.25)
        cpu = stack.cpu_ms_per(cpu_before, stack.cpu(), n)
        row = await conn.fetchrow(
            """
            SELECT (SELECT min(created_at) FROM payments.payment_events
                     WHERE id > $2 AND from_status IS NULL) AS first_stored,
                   (SELECT max(updated_at) FROM payments.payments WHERE id = ANY($1::uuid[]))
                       AS last_charged,
                   (SELECT count(*) FROM provider.charges WHERE payment_id = ANY($1::uuid[]))
                       AS charges,
                   (SELECT count(*) FROM payments.payments
                     WHERE id = ANY($1::uuid[]) AND status = 'processing') AS charged
            """,
            ids,
            first_new,
        )
    finally:
        await conn.close()
    await stack.stop(*services)
    if row is None or row["charged"] != n:
        raise RuntimeError(f"{n} payments published, {row and row['charged']} charged")
    span = (row["last_charged"] - row["first_stored"]).total_seconds()
    return {
        "messages": n,
        "replicas": replicas,
        "already_stored": before,
        "charges_at_provider": row["charges"],
        "span_s": round(span, 3),
        "rate_per_s": round(n / span, 1) if span > 0 else None,
        "cpu_ms_per_payment": cpu,
    }


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "persistence", "payments stored and charged per second from a backlog vs one-row consumer"
    )
    n = ctx.size(5000, 500)
    stack = await ctx.harness.stack("persistence")
    try:
        await stack.start_service("provider", env=NO_SETTLEMENT)
        before = await baseline_rate(stack, n)
        subject = await service_rate(ctx, stack, n)
        after = await baseline_rate(stack, n)
        result.details.update(
            {"baseline_before": before, "payments": subject, "baseline_after": after}
        )
        base = statistics.fmean(r["rate_per_s"] for r in (before, after) if r["rate_per_s"])
        result.add(
            Figure(
                f"stored+charged/s ({n} backlog)",
                subject["rate_per_s"],
                "msg/s",
                "one-row consumer",
                round(base, 1),
                target=">= 0.65",
            )
        )
        # e2e compares its CPU per payment with two of these consumes (all processes).
        ctx.shared["minimal_consume_cpu_ms"] = round(
            statistics.fmean(sum(r["cpu_ms_per_message"].values()) for r in (before, after)), 3
        )
    finally:
        await ctx.harness.release(stack)
    return result
