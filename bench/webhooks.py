"""Scenario 4, webhooks: signed `payment.completed` callbacks, verified and applied per second.

N payments are created `processing` with their charge; N webhooks, signed as the
provider signs them, are POSTed to the gateway (32 connections) with a webhooks
service consuming. The clock runs from the first POST to the last event applied.
Baseline: the same N requests through the same path built from the minimal parts: the
minimal publish handler (routing key webhook.received) and the one-row consumer on the
webhooks queue, from the first POST to the last row. The baseline runs before and
after; the ratio is to their mean.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import Context, create_sink, seed_processing_payments, signed_webhook, wait_until
from bench.harness import Stack
from bench.load import closed_loop, each_request, require
from bench.report import Figure, ScenarioResult
from tools.launch import ServiceProcess

CONCURRENCY = 32


async def baseline_rate(stack: Stack, n: int, *, replicas: int = 1) -> dict[str, Any]:
    await create_sink(stack)
    payments = await seed_processing_payments(stack, n)
    publisher = await stack.start_baseline("publish", "--routing-key", "webhook.received")
    consumers = [
        await stack.start_baseline("consume", "--queue", "webhook-received")
        for _ in range(replicas)
    ]
    requests = [signed_webhook(publisher.port, p) for p in payments]
    conn = await stack.connect()
    cpu_before = stack.cpu()
    try:
        started = time.time()
        load = require(
            await closed_loop(
                publisher.port, each_request(requests), concurrency=CONCURRENCY, count=n
            ),
            202,
            "webhooks, baseline",
        )

        async def done() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM bench_sink") >= n)

        await wait_until(done, within=60 + n / 50, what="minimal webhook path")
        last = await conn.fetchval("SELECT extract(epoch FROM max(at)) FROM bench_sink")
    finally:
        await conn.close()
    cpu = stack.cpu_ms_per(cpu_before, stack.cpu(), n)
    await stack.stop(publisher, *consumers)
    span = float(last) - started
    return {
        "webhooks": n,
        "posts": load.summary(202),
        "span_s": round(span, 3),
        "rate_per_s": round(n / span, 1),
        "cpu_ms_per_webhook": cpu,
    }


async def service_rate(
    ctx: Context,
    stack: Stack,
    gateway: ServiceProcess,
    n: int,
    *,
    replicas: int = 1,
    label: str = "webhooks",
) -> dict[str, Any]:
    payments = await seed_processing_payments(stack, n)
    services = [await stack.start_service("webhooks") for _ in range(replicas)]
    requests = [signed_webhook(gateway.port, p) for p in payments]
    ids = [p[0] for p in payments]
    conn = await stack.connect()
    cpu_before = stack.cpu()
    try:
        started = time.time()
        load = require(
            await closed_loop(
                gateway.port, each_request(requests), concurrency=CONCURRENCY, count=n
            ),
            202,
            "webhooks, gateway",
        )

        async def done() -> bool:
            applied = await conn.fetchval(
                "SELECT count(*) FROM webhooks.webhook_events"
                " WHERE payment_id = ANY($1::uuid[]) AND status = 'applied'",
                ids,
            )
            return bool(applied >= n)

        await wait_until(done, within=120 + n / 10, what="webhooks service", interval=0.25)
        cpu = stack.cpu_ms_per(cpu_before, stack.cpu(), n)
        row = await conn.fetchrow(
            """
            SELECT extract(epoch FROM max(processed_at)) AS last,
                   count(*) FILTER (WHERE status <> 'applied') AS not_applied,
                   (SELECT count(*) FROM payments.payments
                     WHERE id = ANY($1::uuid[]) AND status = 'completed') AS completed
              FROM webhooks.webhook_events WHERE payment_id = ANY($1::uuid[])
            """,
            ids,
        )
    finally:
        await conn.close()
    await stack.stop(*services)
    if row is None:
        raise RuntimeError("no webhook events stored")
    span = float(row["last"]) - started
    return {
        "webhooks": n,
        "replicas": replicas,
        "posts": load.summary(202),
        "completed_payments": row["completed"],
        "not_applied": row["not_applied"],
        "span_s": round(span, 3),
        "rate_per_s": round(n / span, 1),
        "cpu_ms_per_webhook": cpu,
    }


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "webhooks", "signed webhooks verified and applied per second vs the minimal path"
    )
    n = ctx.size(5000, 500)
    stack = await ctx.harness.stack("webhooks")
    try:
        before = await baseline_rate(stack, n)
        gateway = await stack.start_service("gateway")
        subject = await service_rate(ctx, stack, gateway, n)
        await stack.stop(gateway)
        after = await baseline_rate(stack, n)
        result.details.update(
            {"baseline_before": before, "service": subject, "baseline_after": after}
        )
        base = statistics.fmean([before["rate_per_s"], after["rate_per_s"]])
        result.add(
            Figure(
                f"applied/s ({n} webhooks)",
                subject["rate_per_s"],
                "evt/s",
                "minimal publish+consume",
                round(base, 1),
            )
        )
        base_posts = statistics.fmean([before["posts"]["rate_per_s"], after["posts"]["rate_per_s"]])
        result.add(
            Figure(
                f"POST /api/webhooks req/s ({CONCURRENCY} conns)",
                subject["posts"]["rate_per_s"],
                "req/s",
                "minimal handler",
                round(base_posts, 1),
            )
        )
        ctx.shared["webhooks_rate"] = subject["rate_per_s"]
    finally:
        await ctx.harness.release(stack)
    return result
