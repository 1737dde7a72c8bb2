"""`python -m bench [--quick] [--only a,b]`: run the scenarios, print the table.

Writes `<out>/<timestamp>.json` (every figure with its baseline and ratio, and each
scenario's details) and `<out>/<timestamp>.png` (the ratios). Exits 1 if a scenario
failed to run; a figure that misses its target is reported, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from bench import (
    cluster,
    end_to_end,
    intake,
    persistence,
    reads,
    reconciler,
    replicas,
    seed,
    webhooks,
)
from bench.common import Context
from bench.harness import Harness, say
from bench.report import ScenarioResult, table, to_json, write_chart, write_json
from tools.launch import ROOT

Scenario = Callable[[Context], Awaitable[ScenarioResult]]
SCENARIOS: dict[str, Scenario] = {
    "intake": intake.run,
    "persistence": persistence.run,
    "e2e": end_to_end.run,
    # After e2e: the seed's design at the rates e2e reached.
    "seed": seed.run,
    # Not in the default run (it starts three RabbitMQ nodes): `--only e2e,e2e-cluster`.
    "e2e-cluster": cluster.run,
    "webhooks": webhooks.run,
    "reads": reads.run,
    "reconciler": reconciler.run,
    "replicas": replicas.run,
}
RESULTS_DIR = ROOT / "bench" / "results"
# Scenarios that run only when named in --only.
OPT_IN = ("e2e-cluster",)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# A scenario that lost its database or broker connection (someone restarted PostgreSQL
# under it: this machine is shared) runs once more; its figures say so.
_CONNECTION_LOST = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
)


async def _attempt(name: str, ctx: Context) -> ScenarioResult:
    for attempt in (1, 2):
        try:
            result = await SCENARIOS[name](ctx)
        except _CONNECTION_LOST as exc:
            traceback.print_exc()
            if attempt == 1:
                say(f"scenario {name} lost a connection ({exc!r}); running it again")
                await asyncio.sleep(5)
                continue
            return ScenarioResult(name, name, error=repr(exc))
        except Exception as exc:  # noqa: BLE001 - one failed scenario must not stop the rest
            traceback.print_exc()
            return ScenarioResult(name, name, error=repr(exc))
        result.details["attempts"] = attempt
        return result
    raise AssertionError("unreachable")


async def run(harness: Harness, args: argparse.Namespace, names: list[str]) -> list[ScenarioResult]:
    ctx = Context(harness, quick=args.quick)
    results: list[ScenarioResult] = []
    try:
        say("migrating the template database")
        await harness.prepare()
        for name in names:
            say(f"scenario {name}")
            started = time.perf_counter()
            result = await _attempt(name, ctx)
            result.duration_s = round(time.perf_counter() - started, 1)
            results.append(result)
            say(f"scenario {name} took {result.duration_s} s")
            print(table([result]), flush=True)
    finally:
        say("cleaning up: processes, databases, vhosts")
        await harness.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every scenario at a small size")
    parser.add_argument(
        "--only", default="", help=f"comma-separated scenarios, of: {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where results go")
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of the services")
    parser.add_argument("--keep-logs", action="store_true", help="keep the services' logs")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [
        n for n in SCENARIOS if n not in OPT_IN
    ]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    args.out.mkdir(parents=True, exist_ok=True)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    harness = Harness(log_dir=log_dir, log_level=args.log_level)
    results = asyncio.run(run(harness, args, names))
    elapsed = round(time.perf_counter() - started, 1)

    failed = [r.name for r in results if r.error]
    if failed or args.keep_logs:
        say(f"service logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    document = to_json(
        results,
        {
            "started_at": stamp,
            # Databases and vhosts of this run are named bench_<run_id>_*.
            "run_id": harness.run_id,
            "duration_s": elapsed,
            "quick": args.quick,
            "scenarios_run": names,
            "commit": _commit(),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            },
        },
    )
    json_path = args.out / f"{stamp}.json"
    write_json(json_path, document)
    chart_path = args.out / f"{stamp}.png"
    title = f"bench {stamp} ({'quick' if args.quick else 'full'}, commit {document['commit']})"
    write_chart(chart_path, results, title)
    print()
    print(table(results))
    print(f"\n{len(results)} scenario(s) in {elapsed} s; results: {json_path}, chart: {chart_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
