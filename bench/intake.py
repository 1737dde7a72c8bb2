"""Scenario 1, intake: `POST /api/payments/pay` against the minimal publish-with-confirm handler.

Closed loop at 32 connections: requests/s, p50 and p99, the gateway measured between
two runs of the baseline (the ratio is to their mean, so drift in the machine's load
shows up in the details rather than in the ratio). Between them too, the baseline's
handler behind the gateway's middlewares: how much of the limit is left for `/pay`'s
own work (validation, the payment, its message and answer). Then an open loop at half the
gateway's max rate, against the gateway and against the baseline at the same rate.
Without `Idempotency-Key` (the seed's request); with one, each request its own key.
The queue has no consumer and is purged between loads, so each load starts alike.
"""

from __future__ import annotations

import itertools
import statistics
import uuid

from bench.common import JSON, PAY_BODY, Context, pay_request, purge_queues
from bench.load import (
    LoadResult,
    Requests,
    build_request,
    closed_loop,
    ms,
    open_loop,
    percentile,
    require,
    same_request,
)
from bench.report import Figure, ScenarioResult

CONCURRENCY = 32


def _p(result: LoadResult, q: float) -> float | None:
    return ms(percentile(result.latencies(202), q))


def _mean(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "intake", "POST /api/payments/pay vs a minimal aiohttp handler publishing with confirms"
    )
    warmup, duration = ctx.size((2.0, 10.0), (0.5, 2.0))
    stack = await ctx.harness.stack("intake")
    try:
        gateway = await stack.start_service("gateway")
        minimal = await stack.start_baseline("publish", "--routing-key", "payment.requested")
        behind = await stack.start_baseline(
            "publish", "--routing-key", "payment.requested", "--gateway-middlewares"
        )
        subject_request = same_request(pay_request(gateway.port))
        baseline_request = same_request(pay_request(minimal.port))
        behind_request = same_request(pay_request(behind.port))

        async def closed(port: int, requests: Requests, label: str) -> LoadResult:
            await purge_queues(stack)
            await closed_loop(port, requests, concurrency=CONCURRENCY, duration=warmup)
            cpu_before = stack.cpu()
            load = require(
                await closed_loop(port, requests, concurrency=CONCURRENCY, duration=duration),
                202,
                label,
            )
            result.details[label] = {
                **load.summary(202),
                "cpu_ms_per_request": stack.cpu_ms_per(cpu_before, stack.cpu(), load.count),
            }
            return load

        before = await closed(minimal.port, baseline_request, "baseline_before")
        subject = await closed(gateway.port, subject_request, "gateway")
        middlewares = await closed(behind.port, behind_request, "baseline_behind_middlewares")
        after = await closed(minimal.port, baseline_request, "baseline_after")
        base_rps = _mean(before.rate(202), after.rate(202))
        gateway_rps = subject.rate(202)
        middlewares_rps = middlewares.rate(202)
        result.add(
            Figure(
                f"/pay req/s ({CONCURRENCY} conns)",
                round(gateway_rps, 1),
                "req/s",
                "minimal handler",
                round(base_rps or 0, 1),
                target=">= 0.72",
            )
        )
        result.add(
            Figure(
                "minimal handler behind the gateway's middlewares",
                round(middlewares_rps, 1),
                "req/s",
                "minimal handler",
                round(base_rps or 0, 1),
                target=">= 0.85",
                note="what the middlewares leave: they may cost at most 15%",
            )
        )
        result.add(
            Figure(
                "/pay req/s vs the same middlewares",
                round(gateway_rps, 1),
                "req/s",
                "minimal handler behind the gateway's middlewares",
                round(middlewares_rps, 1),
                target=">= 0.85",
                note="what /pay's own work (validation, the payment, its message) costs",
            )
        )
        # e2e compares its CPU per payment with two of these publishes (all processes).
        ctx.shared["minimal_publish_cpu_ms"] = round(
            statistics.fmean(
                sum(result.details[label]["cpu_ms_per_request"].values())
                for label in ("baseline_before", "baseline_after")
            ),
            3,
        )
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            result.add(
                Figure(
                    f"/pay {label} ({CONCURRENCY} conns)",
                    _p(subject, q),
                    "ms",
                    "minimal handler",
                    _mean(_p(before, q), _p(after, q)),
                    better="lower",
                )
            )

        # A client that follows the README sends an Idempotency-Key, a fresh one each time.
        prefix = uuid.uuid4().hex[:8]
        keyed_requests = (
            build_request(
                "POST",
                "/api/payments/pay",
                port=gateway.port,
                body=PAY_BODY,
                headers={**JSON, "Idempotency-Key": f"bench-{prefix}-{i}"},
            )
            for i in itertools.count()
        )
        keyed = await closed(gateway.port, lambda _: next(keyed_requests), "gateway_keyed")
        result.add(
            Figure(
                "/pay req/s with a fresh Idempotency-Key each",
                round(keyed.rate(202), 1),
                "req/s",
                "/pay without one",
                round(gateway_rps, 1),
                target=">= 0.8",
            )
        )

        # Open loop at half the gateway's max: the latency a client sees at a sane load.
        rate = max(1.0, gateway_rps / 2)
        await purge_queues(stack)
        open_base = require(
            await open_loop(minimal.port, baseline_request, rate=rate, duration=duration),
            202,
            "open loop, baseline",
        )
        await purge_queues(stack)
        open_subject = require(
            await open_loop(gateway.port, subject_request, rate=rate, duration=duration),
            202,
            "open loop, gateway",
        )
        result.details["open_loop_rate_per_s"] = round(rate, 1)
        result.details["open_baseline"] = open_base.summary(202)
        result.details["open_gateway"] = open_subject.summary(202)
        result.add(
            Figure(
                f"/pay p99 at half max ({rate:.0f}/s open loop)",
                _p(open_subject, 0.99),
                "ms",
                "minimal handler, same rate",
                _p(open_base, 0.99),
                better="lower",
                target="< 25",
                target_on="value",
            )
        )
        result.add(
            Figure(
                f"/pay p50 at half max ({rate:.0f}/s open loop)",
                _p(open_subject, 0.5),
                "ms",
                "minimal handler, same rate",
                _p(open_base, 0.5),
                better="lower",
            )
        )
        errors = sum(
            load.count - len(load.ok(202))
            for load in (before, subject, middlewares, after, open_subject)
        )
        result.details["non_202_answers"] = errors
        ctx.shared["intake_max_rps"] = gateway_rps
        ctx.shared["publish_max_rps"] = base_rps
    finally:
        await ctx.harness.release(stack)
    return result
