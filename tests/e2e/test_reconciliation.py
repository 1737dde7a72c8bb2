"""Reconciliation end to end: real gateway, payments, provider and reconciler processes.

The provider drops every webhook, so payments stay `processing` until a run asks the
provider what became of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.processes import ROOT, ServiceProcess
from tests.e2e.stack import Stack
from tests.support import eventually
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

# Charges settle within moments and their webhooks are never sent.
NO_WEBHOOKS = {
    "PROVIDER_WEBHOOK_DROP_RATE": "1",
    "PROVIDER_WEBHOOK_DELAY_MS": "50",
    "PROVIDER_DECLINE_RATE": "0.2",
    "PROVIDER_SEED": "20261126",
}
# Runs happen only when asked for: this schedule does not fire during a test.
ON_DEMAND = {"RECONCILE_CRON": "0 0 1 1 *", "RECONCILE_MIN_AGE_SECONDS": "0"}
# The tests send 200 payments as fast as they can; the gateway must not rate-limit them.
UNLIMITED = {"RATE_LIMIT": "100000/second"}
PROVIDER_SAYS = {"succeeded": "completed", "declined": "failed"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def pay_many(http: aiohttp.ClientSession, gateway: ServiceProcess, n: int) -> list[str]:
    gate = asyncio.Semaphore(20)

    async def pay(i: int) -> str:
        body = {"amount": f"{10 + i}.{i % 100:02d}", "customer_id": f"customer-{i}"}
        headers = {"Idempotency-Key": f"order-{i}"}
        async with gate:
            for _ in range(10):
                async with http.post(
                    f"{gateway.url}/api/payments/pay", json=body, headers=headers
                ) as response:
                    if response.status == 429:  # should the rate limit be lower than ours
                        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                        continue
                    assert response.status == 202, await response.text()
                    payment_id: str = (await response.json())["id"]
                    return payment_id
        raise AssertionError(f"payment {i} kept being rate limited")

    return list(await asyncio.gather(*(pay(i) for i in range(n))))


async def wait_unsettled_everywhere_but_the_provider(
    db: asyncpg.Connection[Any], payment_ids: list[str]
) -> None:
    """Every payment is `processing` here while the provider has settled its charge."""

    async def settled_at_the_provider() -> bool:
        row = await db.fetchrow(
            "SELECT count(*) FILTER (WHERE p.status = 'processing') AS processing,"
            "       count(*) FILTER (WHERE c.status IN ('succeeded', 'declined')) AS settled"
            "  FROM payments.payments p JOIN provider.charges c ON c.payment_id = p.id"
            " WHERE p.id = ANY($1::uuid[])",
            payment_ids,
        )
        assert row is not None
        return bool(row["processing"] == row["settled"] == len(payment_ids))

    await eventually(settled_at_the_provider, within=60, interval=0.2)
    charges: int = await db.fetchval(
        "SELECT count(*) FROM provider.charges WHERE payment_id = ANY($1::uuid[])", payment_ids
    )
    assert charges == len(payment_ids)


async def request_run(http: aiohttp.ClientSession, gateway: ServiceProcess) -> str:
    async with http.post(f"{gateway.url}/api/reconciliations") as response:
        assert response.status == 202, await response.text()
        body = await response.json()
    assert body["status"] == "requested"
    assert body["trigger"] == "manual"
    assert response.headers["Location"] == f"/api/reconciliations/{body['id']}"
    run_id: str = body["id"]
    return run_id


async def finished_run(
    http: aiohttp.ClientSession, gateway: ServiceProcess, run_id: str, *, within: float = 60
) -> dict[str, Any]:
    async def finished() -> dict[str, Any] | None:
        async with http.get(f"{gateway.url}/api/reconciliations/{run_id}") as response:
            if response.status == 404:
                return None
            assert response.status == 200, await response.text()
            run: dict[str, Any] = await response.json()
        return run if run["finished_at"] is not None else None

    return await eventually(finished, within=within, interval=0.1)


async def statuses(db: asyncpg.Connection[Any], payment_ids: list[str]) -> dict[str, str]:
    rows = await db.fetch(
        "SELECT id::text, status FROM payments.payments WHERE id = ANY($1::uuid[])", payment_ids
    )
    return {row["id"]: row["status"] for row in rows}


async def provider_verdicts(db: asyncpg.Connection[Any], payment_ids: list[str]) -> dict[str, str]:
    """What each payment's status should be, according to the provider's own records."""
    rows = await db.fetch(
        "SELECT payment_id::text, status FROM provider.charges WHERE payment_id = ANY($1::uuid[])",
        payment_ids,
    )
    return {row["payment_id"]: PROVIDER_SAYS[row["status"]] for row in rows}


async def applied_reconciler_transitions(db: asyncpg.Connection[Any]) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT payment_id::text, count(*) AS n FROM payments.payment_events"
        " WHERE source = 'reconciler' AND applied GROUP BY payment_id"
    )
    return {row["payment_id"]: row["n"] for row in rows}


def log_lines(service: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]


async def test_a_run_settles_every_payment_whose_webhook_was_lost(
    stack: Stack, db: asyncpg.Connection[Any], http: aiohttp.ClientSession
) -> None:
    await stack.start("provider", **NO_WEBHOOKS)
    await stack.start("payments")
    await stack.start("reconciler", **ON_DEMAND)
    gateway = await stack.start("gateway", **UNLIMITED)
    payment_ids = await pay_many(http, gateway, 200)
    await wait_unsettled_everywhere_but_the_provider(db, payment_ids)
    assert set((await statuses(db, payment_ids)).values()) == {"processing"}

    run = await finished_run(http, gateway, await request_run(http, gateway))

    assert run["status"] == "completed", run
    assert run["trigger"] == "manual"
    assert (run["checked"], run["updated"], run["unchanged"], run["errors"]) == (200, 200, 0, 0)
    assert run["error_details"] == []
    assert run["duration_ms"] >= 0
    verdicts = await provider_verdicts(db, payment_ids)
    assert set(verdicts.values()) == {"completed", "failed"}  # the seed declines some
    assert await statuses(db, payment_ids) == verdicts
    changes = {c["payment_id"]: (c["from_status"], c["to_status"]) for c in run["changes"]}
    assert len(run["changes"]) == 200
    assert changes == {p: ("processing", verdicts[p]) for p in payment_ids}
    assert await applied_reconciler_transitions(db) == dict.fromkeys(payment_ids, 1)

    again = await finished_run(http, gateway, await request_run(http, gateway))

    assert again["status"] == "completed", again
    assert (again["checked"], again["updated"], again["errors"]) == (0, 0, 0)
    assert again["changes"] == []
    assert await statuses(db, payment_ids) == verdicts
    assert await applied_reconciler_transitions(db) == dict.fromkeys(payment_ids, 1)
    async with http.get(f"{gateway.url}/api/reconciliations?limit=5") as response:
        listed = [r["id"] for r in (await response.json())["data"]]
    assert listed == [again["id"], run["id"]]


async def test_two_reconcilers_asked_at_once_run_once(
    stack: Stack, db: asyncpg.Connection[Any], http: aiohttp.ClientSession
) -> None:
    await stack.start("provider", **NO_WEBHOOKS)
    proxy = TcpProxy("127.0.0.1", stack.provider_port)
    await proxy.start()
    try:
        await stack.start("payments")
        slow = {
            **ON_DEMAND,
            "PROVIDER_URL": f"http://127.0.0.1:{proxy.port}",
            "RECONCILE_CONCURRENCY": "5",
        }
        reconcilers = [await stack.start("reconciler", **slow) for _ in range(2)]
        gateway = await stack.start("gateway", **UNLIMITED)
        payment_ids = await pay_many(http, gateway, 200)
        await wait_unsettled_everywhere_but_the_provider(db, payment_ids)
        # 200 lookups, 5 at a time, each answer held 50 ms: a run lasts seconds.
        proxy.response_delay_seconds = 0.05

        run_ids = await asyncio.gather(request_run(http, gateway), request_run(http, gateway))
        runs = [await finished_run(http, gateway, run_id) for run_id in run_ids]
    finally:
        await proxy.close()

    by_status = {run["status"]: run for run in runs}
    assert sorted(by_status) == ["completed", "skipped"], runs
    ran, skipped = by_status["completed"], by_status["skipped"]
    assert (ran["checked"], ran["updated"], len(ran["changes"])) == (200, 200, 200)
    assert ran["duration_ms"] >= 1000
    assert (skipped["checked"], skipped["updated"], skipped["changes"]) == (0, 0, [])
    assert await statuses(db, payment_ids) == await provider_verdicts(db, payment_ids)
    assert await applied_reconciler_transitions(db) == dict.fromkeys(payment_ids, 1)
    # What each process logged agrees: one finished the run, one (either) skipped.
    lines = [line for service in reconcilers for line in log_lines(service)]
    finished = [line["run_id"] for line in lines if line["message"] == "reconciliation finished"]
    assert finished == [ran["id"]]
    assert any(line["message"].startswith("reconciliation skipped") for line in lines)


async def test_provider_down_makes_a_partial_run_and_the_next_one_settles(
    stack: Stack, db: asyncpg.Connection[Any], http: aiohttp.ClientSession
) -> None:
    provider = await stack.start("provider", **NO_WEBHOOKS)
    await stack.start("payments")
    reconciler = await stack.start("reconciler", **ON_DEMAND, PROVIDER_TIMEOUT_SECONDS="2")
    gateway = await stack.start("gateway", **UNLIMITED)
    payment_ids = await pay_many(http, gateway, 20)
    await wait_unsettled_everywhere_but_the_provider(db, payment_ids)

    provider.terminate()
    assert await provider.wait_exit(within=15) == 0
    down = await finished_run(http, gateway, await request_run(http, gateway))

    assert down["status"] == "partial", down
    assert (down["checked"], down["updated"], down["errors"]) == (20, 0, 20)
    assert down["changes"] == []
    assert {d["payment_id"] for d in down["error_details"]} == set(payment_ids)
    assert all(d["error"] for d in down["error_details"])
    assert set((await statuses(db, payment_ids)).values()) == {"processing"}
    assert await applied_reconciler_transitions(db) == {}
    logged = [
        line
        for line in log_lines(reconciler)
        if line["message"] == "reconciliation finished" and line["run_id"] == down["id"]
    ]
    assert [(line["status"], line["errors"]) for line in logged] == [("partial", 20)]

    # Back on the same port; everything it knows is in the database.
    await stack.start("provider", **NO_WEBHOOKS)
    back = await finished_run(http, gateway, await request_run(http, gateway))

    assert back["status"] == "completed", back
    assert (back["checked"], back["updated"], back["errors"]) == (20, 20, 0)
    assert await statuses(db, payment_ids) == await provider_verdicts(db, payment_ids)
    assert await applied_reconciler_transitions(db) == dict.fromkeys(payment_ids, 1)


def test_an_invalid_schedule_stops_the_reconciler_at_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.reconciler"],
        cwd=ROOT,
        env={**os.environ, "RECONCILE_CRON": "not a cron"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "reconciler: invalid configuration" in result.stderr
    assert "RECONCILE_CRON" in result.stderr
    assert "'not a cron' is not a cron expression" in result.stderr
    assert "Traceback" not in result.stderr
