"""Scenario 7, replicas: scenarios 2 and 4 with one and then two processes of the service.

Both counts run here, back to back on the same stack, so the ratio (two replicas over
one) compares like with like. On this 2-core machine the broker, the database, the
provider and the load share the same cores, so a ratio near 1 means the service is
already CPU-bound on the machine rather than on one process.
"""

from __future__ import annotations

from bench import persistence, webhooks
from bench.common import Context
from bench.report import Figure, ScenarioResult


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("replicas", "one against two replicas of payments and webhooks")
    n = ctx.size(5000, 500)

    stack = await ctx.harness.stack("replicas-payments")
    try:
        await stack.start_service("provider", env=persistence.NO_SETTLEMENT)
        one = await persistence.service_rate(ctx, stack, n, replicas=1, label="payments-x1")
        two = await persistence.service_rate(ctx, stack, n, replicas=2, label="payments-x2")
        result.details["payments"] = {"one": one, "two": two}
        result.add(
            Figure(
                f"payments stored+charged/s, 2 replicas ({n})",
                two["rate_per_s"],
                "msg/s",
                "1 replica",
                one["rate_per_s"],
            )
        )
    finally:
        await ctx.harness.release(stack)

    stack = await ctx.harness.stack("replicas-webhooks")
    try:
        gateway = await stack.start_service("gateway")
        one = await webhooks.service_rate(ctx, stack, gateway, n, replicas=1, label="webhooks-x1")
        two = await webhooks.service_rate(ctx, stack, gateway, n, replicas=2, label="webhooks-x2")
        result.details["webhooks"] = {"one": one, "two": two}
        result.add(
            Figure(
                f"webhooks applied/s, 2 replicas ({n})",
                two["rate_per_s"],
                "evt/s",
                "1 replica",
                one["rate_per_s"],
            )
        )
    finally:
        await ctx.harness.release(stack)
    return result
