"""Scenario 3, end to end: `/pay` to `completed`, through the provider and its webhook.

The whole stack runs (gateway, payments, webhooks, the simulated provider settling
after PROVIDER_WEBHOOK_DELAY_MS and never declining). An open loop offers payments at
a steady rate, in steps that climb as fractions of the intake limit (the gateway's
max `/pay` rate, from the intake scenario of the same run, or measured here first),
and once one is not sustained, one more halfway back to the last that was.
A step is sustained when every accepted payment completes, completions keep up with
the offered rate, and the p99 from `/pay` to `completed` (less the provider's delay)
stays under 2 s; between steps the stack drains. After the last step, nothing may
be left behind: no payment unsettled, no message queued or parked, no webhook
undelivered or unapplied.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import Context, pay_request, purge_queues, wait_until
from bench.harness import Stack
from bench.load import closed_loop, ms, open_loop, percentile, same_request
from bench.persistence import baseline_rate
from bench.report import Figure, ScenarioResult
from libs.common.outbox import RELAY_LOCK_KEY

DELAY_MS = 100
MAX_P99_SECONDS = 2.0
DRAIN_SECONDS = 30.0


async def _measure_intake_limit(stack: Stack, port: int, quick: bool) -> float:
    request = same_request(pay_request(port))
    await closed_loop(port, request, concurrency=32, duration=1.0)
    load = await closed_loop(port, request, concurrency=32, duration=2.0 if quick else 5.0)
    await purge_queues(stack)
    return load.rate(202)


# Where each design keeps its payments: ours, and the seed's (bench.minimal seed).
OURS = "payments.payments"


async def run_step(
    stack: Stack,
    port: int,
    rate: float,
    duration: float,
    *,
    table: str = OURS,
    accepted_status: int = 202,
) -> dict[str, Any]:
    """One step of an open load at `rate`: what completed, how fast, how late, at what CPU."""
    cpu_before = stack.cpu()
    load = await open_loop(
        port, same_request(pay_request(port)), rate=rate, duration=duration, keep_bodies=True
    )
    accepted = {uuid.UUID(json.loads(s.body)["id"]): s.sent_at for s in load.ok(accepted_status)}
    ids = list(accepted)
    conn = await stack.connect()
    try:

        async def settled() -> bool:
            n = await conn.fetchval(
                f"SELECT count(*) FROM {table}"  # noqa: S608 - one of two fixed table names
                " WHERE id = ANY($1::uuid[]) AND status = 'completed'",
                ids,
            )
            return bool(n >= len(ids))

        drained = True
        try:
            await wait_until(settled, within=DRAIN_SECONDS, what="drain", interval=0.25)
        except TimeoutError:
            drained = False
        rows = await conn.fetch(
            f"SELECT id, status, extract(epoch FROM updated_at) AS at FROM {table}"  # noqa: S608
            " WHERE id = ANY($1::uuid[])",
            ids,
        )
        extra = (
            {"events": await _events_published(conn, ids), "phases": await _phases(conn, accepted)}
            if table == OURS
            else {}
        )
    finally:
        await conn.close()
    cpu = stack.cpu_ms_per(cpu_before, stack.cpu(), len(ids))
    done = {r["id"]: float(r["at"]) for r in rows if r["status"] == "completed"}
    latencies = [done[i] - accepted[i] - DELAY_MS / 1000 for i in done]
    span = (max(done.values()) - min(accepted.values())) if done else 0.0
    completion_rate = len(done) / span if span > 0 else 0.0
    p99 = percentile(latencies, 0.99)
    sustained = (
        drained
        and len(done) == len(ids)
        and len(ids) == load.count
        and completion_rate >= 0.9 * rate
        and p99 is not None
        and p99 < MAX_P99_SECONDS
    )
    return {
        "offered_per_s": round(rate, 1),
        "pay": load.summary(accepted_status),
        "accepted": len(ids),
        "completed": len(done),
        "completion_rate_per_s": round(completion_rate, 1),
        "e2e_p50_ms": ms(percentile(latencies, 0.5)),
        "e2e_p99_ms": ms(p99),
        "pay_p50_ms": ms(percentile(load.latencies(accepted_status), 0.5)),
        "pay_p99_ms": ms(percentile(load.latencies(accepted_status), 0.99)),
        "drained": drained,
        "sustained": sustained,
        # Includes whatever the drain took; per accepted payment.
        "cpu_ms_per_payment": cpu,
        "cpu_ms_per_payment_total": round(sum(cpu.values()), 3),
        **extra,
    }


# Each payment's audit rows: stored (`pending`), charged (`processing`), `completed`.
_PHASES_SQL = """
SELECT payment_id,
       extract(epoch FROM min(created_at) FILTER (WHERE to_status = 'pending')) AS stored,
       extract(epoch FROM min(created_at) FILTER (WHERE to_status = 'processing')) AS charged,
       extract(epoch FROM min(created_at) FILTER (WHERE to_status = 'completed')) AS completed
  FROM payments.payment_events
 WHERE payment_id = ANY($1::uuid[]) AND applied
 GROUP BY payment_id
"""


async def _phases(conn: Any, accepted: dict[uuid.UUID, float]) -> dict[str, Any]:
    """Where a payer's wait goes, p50 and p99 of each leg, from the audit rows' times.

    accepted → stored: the gateway's publish, the queue, the payments service's batch;
    stored → charged: the provider's charge call and its write; charged → completed,
    less the provider's delay: its webhook scheduler, the gateway, the webhooks service.
    Each row's time is its transaction's start, so a batch's rows share one.
    """
    rows = await conn.fetch(_PHASES_SQL, list(accepted))
    legs: dict[str, list[float]] = {"accepted_to_stored": [], "stored_to_charged": [],
                                    "charged_to_completed_less_delay": []}  # fmt: skip
    for r in rows:
        if None in (r["stored"], r["charged"], r["completed"]):
            continue
        legs["accepted_to_stored"].append(float(r["stored"]) - accepted[r["payment_id"]])
        legs["stored_to_charged"].append(float(r["charged"] - r["stored"]))
        legs["charged_to_completed_less_delay"].append(
            float(r["completed"] - r["charged"]) - DELAY_MS / 1000
        )
    return {
        leg: {"p50_ms": ms(percentile(values, 0.5)), "p99_ms": ms(percentile(values, 0.99))}
        for leg, values in legs.items()
    }


async def _events_published(conn: Any, ids: list[uuid.UUID]) -> dict[str, Any]:
    """The step's payment events: how many, how fast they went out, how long they waited."""
    row = await conn.fetchrow(
        """
        SELECT count(*) AS events, count(published_at) AS published,
               extract(epoch FROM max(published_at) - min(published_at)) AS span,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM published_at - created_at)) AS lag_p50,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM published_at - created_at)) AS lag_p99
          FROM payments.outbox WHERE payment_id = ANY($1::uuid[])
        """,  # noqa: E501 - one SQL statement
        ids,
    )
    span = float(row["span"] or 0)
    return {
        "written": row["events"],
        "published": row["published"],
        "published_per_s": round(row["published"] / span, 1) if span > 0 else None,
        "lag_p50_ms": ms(row["lag_p50"]),
        "lag_p99_ms": ms(row["lag_p99"]),
    }


async def _relay_cost(stack: Stack, port: int, rate: float, duration: float) -> dict[str, Any]:
    """What relaying costs: events pile up while the bench holds the relay's turn (its
    advisory lock, as another replica would), then the CPU of draining them, per event."""
    conn = await stack.connect()
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", RELAY_LOCK_KEY)
        load = await open_loop(
            port, same_request(pay_request(port)), rate=rate, duration=duration, keep_bodies=True
        )
        ids = [uuid.UUID(json.loads(s.body)["id"]) for s in load.ok(202)]

        async def completed() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM payments.payments"
                " WHERE id = ANY($1::uuid[]) AND status = 'completed'",
                ids,
            )
            return bool(n >= len(ids))

        await wait_until(completed, within=DRAIN_SECONDS, what="completion", interval=0.25)
        unsent_sql = "SELECT count(*) FROM payments.outbox WHERE published_at IS NULL"
        backlog = int(await conn.fetchval(unsent_sql))
        before, started = stack.cpu(), time.monotonic()
        await conn.execute("SELECT pg_advisory_unlock($1)", RELAY_LOCK_KEY)

        async def drained() -> bool:
            return int(await conn.fetchval(unsent_sql)) == 0

        await wait_until(drained, within=DRAIN_SECONDS, what="outbox drain", interval=0.02)
        took = time.monotonic() - started
        after = stack.cpu()
    finally:
        await conn.close()
    return {
        "payments": len(ids),
        "events": backlog,
        "drain_seconds": round(took, 3),
        "drain_events_per_s": round(backlog / took, 1) if took > 0 else None,
        "cpu_ms_per_event": stack.cpu_ms_per(before, after, backlog),
    }


_LEFT_BEHIND_SQL = """
SELECT (SELECT count(*) FROM payments.payments WHERE status <> 'completed')
           AS unsettled_payments,
       (SELECT count(*) FROM provider.webhook_deliveries WHERE state <> 'delivered')
           AS undelivered_webhooks,
       (SELECT count(*) FROM webhooks.webhook_events WHERE status <> 'applied')
           AS unapplied_events
"""


async def left_behind(stack: Stack, *, settle_within: float) -> dict[str, Any]:
    """What is still unfinished once the stack had `settle_within` seconds to finish."""
    conn = await stack.connect()
    try:

        async def finished() -> bool:
            row = await conn.fetchrow(_LEFT_BEHIND_SQL)
            return row is not None and not any(row.values())

        with contextlib.suppress(TimeoutError):
            await wait_until(finished, within=settle_within, what="settling", interval=0.5)
        row = await conn.fetchrow(_LEFT_BEHIND_SQL)
    finally:
        await conn.close()
    depths = await stack.queue_depths()
    found: dict[str, Any] = dict(row or {})
    found["queued_or_parked_messages"] = sum(depths.values())
    found["queues"] = depths
    return found


def _add_event_figures(result: ScenarioResult, best: dict[str, Any], relay: dict[str, Any]) -> None:
    events = best["events"]
    result.add(
        Figure(
            f"payment events published/s at {best['offered_per_s']:.0f} pay/s",
            events["published_per_s"],
            "events/s",
            "payments completed/s, same step",
            best["completion_rate_per_s"],
            note=f"outbox lag p50 {events['lag_p50_ms']} ms, p99 {events['lag_p99_ms']} ms",
        )
    )
    # The relay's CPU per payment (its processes' CPU while draining, per event, times the
    # events a payment has) against everything a payment costs in the sustained step.
    # The payments service (where the relay runs) and the two servers it talks to; the
    # servers' figures are machine-wide, so whatever else the machine runs counts too.
    per_event = sum(
        ms_per_event
        for name, ms_per_event in relay["cpu_ms_per_event"].items()
        if name.startswith(("payments", "postgres", "rabbitmq"))
    )
    per_payment = per_event * events["written"] / max(best["accepted"], 1)
    total = sum(best["cpu_ms_per_payment"].values())
    result.add(
        Figure(
            "relay CPU per payment",
            round(per_payment, 3),
            "ms",
            "all CPU per payment, sustained step",
            round(total, 3),
            better="lower",
            note="the ratio is the relay's share; the event row written by the transition"
            " itself is in PostgreSQL's part of the baseline",
        )
    )


Step = Callable[[float], Awaitable[dict[str, Any]]]


async def climb(
    step: Step, limit: float, fractions: list[float], *, quick: bool
) -> list[dict[str, Any]]:
    """Steps at `fractions` of `limit` until one is not sustained, then once halfway back
    to the last that was; if the first is not sustained, two steps down instead."""
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    queue = list(fractions)
    going_down = halved = False
    while queue:
        fraction = queue.pop(0)
        result = await step(limit * fraction)
        result["fraction_of_limit"] = fraction
        steps.append(result)
        if result["sustained"]:
            best = result
            if going_down or halved:
                break
        elif best is None and not going_down and fraction > 0.02:
            going_down = True
            queue = [fraction / 2, fraction / 4]
        elif best is not None and not going_down and not halved and not quick:
            halved = True
            queue = [round((best["fraction_of_limit"] + fraction) / 2, 4)]
        elif not going_down:
            break
    return steps


def best_of(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest sustained step."""
    sustained = [s for s in steps if s["sustained"]]
    return max(sustained, key=lambda s: s["offered_per_s"]) if sustained else None


# The latency targets hold at these fractions of the highest sustained rate.
LATENCY_AT = {"half": 0.5, "a tenth": 0.1}
LATENCY_TARGETS = {"p50": "< 50", "p99": "< 250"}


async def minimal_parts_cpu(ctx: Context) -> dict[str, float]:
    """CPU ms of one minimal publish and one one-row consume, from this run's intake and
    persistence scenarios, or measured here when they did not run."""
    if "minimal_publish_cpu_ms" not in ctx.shared:
        stack = await ctx.harness.stack("e2e-minimal")
        try:
            minimal = await stack.start_baseline("publish", "--routing-key", "payment.requested")
            request = same_request(pay_request(minimal.port))
            await closed_loop(minimal.port, request, concurrency=32, duration=1.0)
            before = stack.cpu()
            load = await closed_loop(minimal.port, request, concurrency=32, duration=3.0)
            per = stack.cpu_ms_per(before, stack.cpu(), load.count)
            ctx.shared["minimal_publish_cpu_ms"] = round(sum(per.values()), 3)
            await stack.stop(minimal)
            consumed = await baseline_rate(stack, ctx.size(2000, 500))
            ctx.shared["minimal_consume_cpu_ms"] = round(
                sum(consumed["cpu_ms_per_message"].values()), 3
            )
        finally:
            await ctx.harness.release(stack)
    return {
        "publish": ctx.shared["minimal_publish_cpu_ms"],
        "consume": ctx.shared["minimal_consume_cpu_ms"],
    }


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("e2e", "/pay to completed under a steady open load vs the intake limit")
    duration = ctx.size(15.0, 4.0)
    fractions = ctx.size([0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5], [0.1, 0.25])
    stack = await ctx.harness.stack("e2e")
    try:
        gateway = await stack.start_service("gateway")
        limit = ctx.shared.get("intake_max_rps")
        if limit is None:
            limit = await _measure_intake_limit(stack, gateway.port, ctx.quick)
            result.details["intake_limit_measured_here"] = True
            # e2e-cluster and seed, later in the run, offer the same rates.
            ctx.shared["intake_max_rps"] = limit
        result.details["intake_limit_per_s"] = round(limit, 1)
        await stack.start_service(
            "provider", PROVIDER_WEBHOOK_DELAY_MS=str(DELAY_MS), PROVIDER_DECLINE_RATE="0"
        )
        await stack.start_service("payments")
        await stack.start_service("webhooks")

        async def step(rate: float) -> dict[str, Any]:
            return await run_step(stack, gateway.port, rate, duration)

        steps = await climb(step, limit, fractions, quick=ctx.quick)
        best = best_of(steps)
        latency_steps: dict[str, dict[str, Any]] = {}
        if best is not None:
            for name, fraction in LATENCY_AT.items():
                latency_steps[name] = await step(best["offered_per_s"] * fraction)
        result.details["steps"] = steps
        result.details["latency_steps"] = latency_steps
        if best is not None:
            ctx.shared["e2e_best"] = best
            ctx.shared["e2e_latency_steps"] = latency_steps
            try:
                relay = await _relay_cost(stack, gateway.port, best["offered_per_s"] / 2, duration)
            except TimeoutError as exc:
                result.details["relay"] = {"error": str(exc)}
            else:
                result.details["relay"] = relay
                _add_event_figures(result, best, relay)
        behind = await left_behind(stack, settle_within=DRAIN_SECONDS)
        result.details["left_behind"] = behind
        accepted = sum(s["accepted"] for s in [*steps, *latency_steps.values()])
    finally:
        await ctx.harness.release(stack)

    sustained = best["offered_per_s"] if best else 0.0
    result.add(
        Figure(
            "sustained payments/s end to end",
            sustained,
            "pay/s",
            "intake limit (/pay max)",
            round(limit, 1),
            target=">= 0.25",
        )
    )
    if best is not None:
        parts = await minimal_parts_cpu(ctx)
        floor = 2 * parts["publish"] + 2 * parts["consume"]
        result.details["minimal_parts_cpu_ms"] = {**parts, "floor": round(floor, 3)}
        result.add(
            Figure(
                f"CPU per completed payment at {sustained:.0f}/s (all processes)",
                best["cpu_ms_per_payment_total"],
                "ms",
                "minimal parts: 2 publishes + 2 one-row consumes",
                round(floor, 3),
                better="lower",
                target="<= 2.5",
            )
        )
        for name, latency_step in latency_steps.items():
            rate = latency_step["offered_per_s"]
            for label, target in LATENCY_TARGETS.items():
                result.add(
                    Figure(
                        f"/pay→completed {label} at {name} ({rate:.0f}/s), less {DELAY_MS} ms",
                        latency_step[f"e2e_{label}_ms"],
                        "ms",
                        "/pay latency, same step",
                        latency_step[f"pay_{label}_ms"],
                        better="lower",
                        target=target,
                        target_on="value",
                    )
                )
    unfinished = (
        behind["unsettled_payments"]
        + behind["undelivered_webhooks"]
        + behind["unapplied_events"]
        + behind["queued_or_parked_messages"]
    )
    result.add(
        Figure(
            "left behind after the load",
            unfinished,
            "items",
            "payments accepted",
            accepted,
            better="lower",
            target="<= 0",
            target_on="value",
        )
    )
    return result
