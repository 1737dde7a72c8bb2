"""Scenario 6, reconciler: settle N stale `processing` payments via `POST /api/reconciliations`.

The provider is a fake in bench/ (`bench.minimal provider`) that answers every call
after 20 ms with a succeeded charge, rather than the simulated provider behind a
delaying proxy: the figure is about the reconciler, so the provider's answer time must
be exactly the 20 ms asked for, and the real provider's own database work and the
proxy's copying would take CPU from the reconciler on this 2-core machine and blur it.

The clock runs from the POST to the run's `finished_at`. Baselines, in the same run:
the least a reconciliation can do (`bench.minimal reconcile`: one SELECT, then per
payment the same provider call with the same concurrency and one UPDATE), before and
after the service; and the floor the concurrency sets, N / concurrency x 20 ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from typing import Any

from bench.common import Context, seed_processing_payments, wait_until
from bench.harness import Stack
from bench.load import build_request, closed_loop, same_request
from bench.report import Figure, ScenarioResult
from tools.launch import ROOT

PROVIDER_DELAY_MS = 20
CONCURRENCY = 20  # RECONCILE_CONCURRENCY's default
STALE_SECONDS = 600


async def _reset(stack: Stack) -> None:
    conn = await stack.connect()
    try:
        await conn.execute("UPDATE payments.payments SET status = 'processing'")
        await conn.execute("VACUUM ANALYZE payments.payments")
    finally:
        await conn.close()


async def _minimal(stack: Stack, provider_url: str) -> dict[str, Any]:
    await _reset(stack)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.minimal",
        "reconcile",
        "--provider-url",
        provider_url,
        "--concurrency",
        str(CONCURRENCY),
        cwd=ROOT,
        env=stack.env(),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=300)
    if process.returncode != 0:
        raise RuntimeError(f"minimal reconcile failed ({process.returncode})")
    found: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return found


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "reconciler", "stale processing payments settled by one run, provider answering in 20 ms"
    )
    n = ctx.size(10_000, 1_000)
    stack = await ctx.harness.stack("reconciler")
    try:
        await seed_processing_payments(stack, n, age_seconds=STALE_SECONDS)
        fake = await stack.start_baseline("provider", "--delay-ms", str(PROVIDER_DELAY_MS))
        stack.provider_url = fake.url
        before = await _minimal(stack, fake.url)
        await _reset(stack)
        gateway = await stack.start_service("gateway")
        reconciler = await stack.start_service(
            "reconciler",
            RECONCILE_MIN_AGE_SECONDS=str(STALE_SECONDS // 2),
            RECONCILE_CONCURRENCY=str(CONCURRENCY),
        )
        request = build_request("POST", "/api/reconciliations", port=gateway.port)
        started = time.perf_counter()
        answer = await closed_loop(gateway.port, same_request(request), concurrency=1, count=1)
        sample = answer.samples[0]
        if sample.status != 202:
            raise RuntimeError(f"POST /api/reconciliations answered {sample.status}")
        conn = await stack.connect()
        try:
            # The run id is in the answer only when bodies are kept; read the newest run.
            async def finished() -> bool:
                row = await conn.fetchrow(
                    "SELECT finished_at FROM reconciler.reconciliation_logs"
                    " ORDER BY started_at DESC LIMIT 1"
                )
                return row is not None and row["finished_at"] is not None

            await wait_until(finished, within=60 + n / 50, what="reconciliation", interval=0.05)
            elapsed = time.perf_counter() - started
            run_row = await conn.fetchrow(
                "SELECT status, checked, updated, errors, duration_ms"
                " FROM reconciler.reconciliation_logs ORDER BY started_at DESC LIMIT 1"
            )
            completed = await conn.fetchval(
                "SELECT count(*) FROM payments.payments WHERE status = 'completed'"
            )
        finally:
            await conn.close()
        await stack.stop(reconciler, gateway)
        after = await _minimal(stack, fake.url)
        floor = n / CONCURRENCY * PROVIDER_DELAY_MS / 1000
        baseline = statistics.fmean([before["elapsed_s"], after["elapsed_s"]])
        result.details.update(
            {
                "payments": n,
                "run": dict(run_row) if run_row else None,
                "completed_after_run": completed,
                "post_to_finished_s": round(elapsed, 3),
                "minimal_before": before,
                "minimal_after": after,
                "floor_s": floor,
            }
        )
        result.add(
            Figure(
                f"settle {n} stale payments",
                round(elapsed, 2),
                "s",
                "minimal reconcile loop",
                round(baseline, 2),
                better="lower",
                target="< 20" if n >= 10_000 else None,
                target_on="value",
            )
        )
        result.add(
            Figure(
                f"settle {n} stale payments vs the floor",
                round(elapsed, 2),
                "s",
                f"N/{CONCURRENCY} x {PROVIDER_DELAY_MS} ms",
                floor,
                better="lower",
            )
        )
    finally:
        await ctx.harness.release(stack)
    return result
