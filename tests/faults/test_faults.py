"""Faults injected into the running platform under load; README's promises must hold.

Each case runs every service as a real process, loads the gateway for a few seconds
(see tests/faults/harness.py), injects one fault mid-load, then checks nothing was lost
or duplicated and that the platform recovered by itself. The session ends with a table
of every case (also in `<pytest tmp>/faults/results.md`, and as JSON in the file named
by FAULT_REPORT when set).

Some faults restart or pause the machine's PostgreSQL or RabbitMQ: every such case puts
the server back (running, not paused) whatever happens, in a finalizer as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.faults.harness import (
    CONSUMERS,
    SERVICES,
    FaultContext,
    clients_saw_503,
    ensure_postgres_running,
    ensure_rabbitmq_running,
    postgres_paused,
    reconciliation_in_progress,
    restart_postgres,
    restart_rabbitmq,
    run_case,
    services_saw_database_errors,
    url_via,
)
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(170)]

# What the services are given as their grace period on SIGTERM (tests.e2e.stack.Stack).
GRACE_SECONDS = 5.0
# A process may take a moment beyond its grace period to unwind the interpreter.
EXIT_SLACK_SECONDS = 2.0
BROKER_CUT_SECONDS = 3.0
# Past the services' DB_COMMAND_TIMEOUT_SECONDS (2 s here): commands time out meanwhile.
POSTGRES_PAUSE_SECONDS = 5.0
# The reconciler only works when asked, and only on payments a webhook did not settle:
# where it is the target, it is asked twice a second and the provider drops a share of
# its webhooks, so that runs have work to do when the fault hits one mid-run.
RECONCILE_EVERY_SECONDS = 0.5
RECONCILER_AT_WORK = {"PROVIDER_WEBHOOK_DROP_RATE": "0.3"}


@pytest.fixture
def servers_restored() -> Iterator[None]:
    """Whatever the case did to PostgreSQL and RabbitMQ, they run again afterwards."""
    yield
    ensure_postgres_running()
    ensure_rabbitmq_running()


@pytest.mark.parametrize("service", CONSUMERS)
async def test_consumer_killed_mid_load(
    service: str, database_url: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    async def inject(ctx: FaultContext) -> None:
        if service == "reconciler":
            await reconciliation_in_progress(ctx)
        ctx.platform.kill(service)  # SIGKILL: nothing is acked or committed any more
        await asyncio.sleep(1.0)  # meanwhile its queue fills up
        ctx.ended()
        await ctx.platform.restart(service)

    await run_case(
        f"SIGKILL {service}",
        inject,
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        tmp_path=tmp_path,
        reconcile_every=RECONCILE_EVERY_SECONDS if service == "reconciler" else None,
        env=RECONCILER_AT_WORK if service == "reconciler" else None,
    )


async def test_broker_connection_cut(database_url: str, rabbitmq_url: str, tmp_path: Path) -> None:
    broker = urlsplit(rabbitmq_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    await proxy.start()

    async def inject(ctx: FaultContext) -> None:
        await proxy.cut()
        await asyncio.sleep(BROKER_CUT_SECONDS)
        proxy.restore()
        ctx.ended()

    try:
        await run_case(
            f"broker connection cut {BROKER_CUT_SECONDS:.0f}s",
            inject,
            database_url=database_url,
            rabbitmq_url=rabbitmq_url,
            tmp_path=tmp_path,
            services_rabbitmq_url=url_via(rabbitmq_url, proxy.port),
            observed=clients_saw_503,
        )
    finally:
        await proxy.close()


async def test_rabbitmq_restarted(
    database_url: str, rabbitmq_url: str, tmp_path: Path, servers_restored: None
) -> None:
    async def inject(ctx: FaultContext) -> None:
        await restart_rabbitmq()
        ctx.ended()

    await run_case(
        "RabbitMQ restarted",
        inject,
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        tmp_path=tmp_path,
        observed=clients_saw_503,
    )


async def test_postgres_restarted(
    database_url: str, rabbitmq_url: str, tmp_path: Path, servers_restored: None
) -> None:
    async def inject(ctx: FaultContext) -> None:
        await restart_postgres()
        ctx.ended()

    await run_case(
        "PostgreSQL restarted",
        inject,
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        tmp_path=tmp_path,
        observed=services_saw_database_errors,
    )


async def test_postgres_paused_past_command_timeout(
    database_url: str, rabbitmq_url: str, tmp_path: Path, servers_restored: None
) -> None:
    async def inject(ctx: FaultContext) -> None:
        async with postgres_paused():
            await asyncio.sleep(POSTGRES_PAUSE_SECONDS)
        ctx.ended()

    await run_case(
        f"PostgreSQL paused {POSTGRES_PAUSE_SECONDS:.0f}s",
        inject,
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        tmp_path=tmp_path,
        env={"DB_COMMAND_TIMEOUT_SECONDS": "2"},
        observed=services_saw_database_errors,
    )


@pytest.mark.parametrize("service", SERVICES)
async def test_service_terminated_mid_load(
    service: str, database_url: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    async def inject(ctx: FaultContext) -> None:
        if service == "reconciler":
            await reconciliation_in_progress(ctx)
        code, took = await ctx.platform.terminate(service)
        ctx.details["exit_code"], ctx.details["exit_seconds"] = code, round(took, 2)
        if code != 0:
            ctx.notes.append(f"{service} exited with {code} on SIGTERM")
        if took > GRACE_SECONDS + EXIT_SLACK_SECONDS:
            ctx.notes.append(f"{service} took {took:.1f}s to exit, its grace is {GRACE_SECONDS}s")
        ctx.ended()
        await ctx.platform.restart(service)

    await run_case(
        f"SIGTERM {service}",
        inject,
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        tmp_path=tmp_path,
        reconcile_every=RECONCILE_EVERY_SECONDS if service == "reconciler" else None,
        env=RECONCILER_AT_WORK if service == "reconciler" else None,
    )
