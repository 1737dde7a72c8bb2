"""Scenario `seed`: the end-to-end figures of `e2e` against the design our users come from.

`bench.minimal seed` is the seed's shape in one synchronous process: `/pay` inserts the
payment, calls the provider and answers; the provider's webhook updates it. It runs on
the same database server and the same simulated provider (same settlement delay), under
the same open load, at the rates `e2e` measured in this run: its highest sustained rate,
then half and a tenth of it. The figures put ours against the seed's at each: CPU per
completed payment (every process, servers included), and `/pay` to `completed` less the
provider's delay, with what each adds over the seed. Then the seed's own highest
sustained rate, by the same ladder as `e2e`, against ours.
"""

from __future__ import annotations

from typing import Any

from bench import end_to_end
from bench.common import Context
from bench.end_to_end import DELAY_MS, LATENCY_AT, best_of, climb, run_step
from bench.report import Figure, ScenarioResult

SEED_TABLE = "seed.payments"
# The message-driven design's CPU per payment, against the seed's.
CPU_TARGET = "<= 1.5"


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("seed", "the message-driven design against the seed's synchronous one")
    if "e2e_best" not in ctx.shared:
        # Named alone (--only seed): the figures of ours it compares with come first.
        await end_to_end.run(ctx)
        result.details["e2e_measured_here"] = True
    best: dict[str, Any] | None = ctx.shared.get("e2e_best")
    latency_steps: dict[str, dict[str, Any]] = ctx.shared.get("e2e_latency_steps", {})
    if best is None:
        raise RuntimeError("e2e sustained no step: nothing to compare the seed with")
    duration = ctx.size(15.0, 4.0)
    stack = await ctx.harness.stack("seed")
    try:
        await stack.start_service(
            "provider", PROVIDER_WEBHOOK_DELAY_MS=str(DELAY_MS), PROVIDER_DECLINE_RATE="0"
        )
        # On the gateway's port: the provider delivers its webhooks there.
        seed = await stack.start_baseline("seed", port=stack.gateway_port)

        async def step(rate: float) -> dict[str, Any]:
            return await run_step(
                stack, seed.port, rate, duration, table=SEED_TABLE, accepted_status=201
            )

        ours = {"highest": best, **latency_steps}
        theirs = {name: await step(s["offered_per_s"]) for name, s in ours.items()}
        result.details["at_our_rates"] = theirs
        fractions = ctx.size([0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5], [0.1, 0.25])
        ladder = await climb(step, ctx.shared["intake_max_rps"], fractions, quick=ctx.quick)
        result.details["ladder"] = ladder
    finally:
        await ctx.harness.release(stack)

    seed_best = best_of(ladder)
    result.add(
        Figure(
            "sustained payments/s end to end, ours",
            best["offered_per_s"],
            "pay/s",
            "the seed's, same ladder",
            seed_best["offered_per_s"] if seed_best else None,
        )
    )
    for name, mine in ours.items():
        other = theirs[name]
        rate = mine["offered_per_s"]
        at = f"at {rate:.0f}/s" + ("" if name == "highest" else f" ({name} of our highest)")
        if not other["sustained"]:
            result.details.setdefault("not_sustained_by_the_seed", []).append(name)
        result.add(
            Figure(
                f"CPU per completed payment {at}",
                mine["cpu_ms_per_payment_total"],
                "ms",
                "the seed, same rate",
                other["cpu_ms_per_payment_total"],
                better="lower",
                target=CPU_TARGET if name == "highest" else None,
            )
        )
        for label in ("p50", "p99"):
            result.add(
                Figure(
                    f"/pay→completed {label} {at}, less {DELAY_MS} ms",
                    mine[f"e2e_{label}_ms"],
                    "ms",
                    "the seed, same rate",
                    other[f"e2e_{label}_ms"],
                    better="lower",
                    note="the ratio is what ours adds",
                )
            )
    result.details["latency_fractions"] = LATENCY_AT
    return result
