"""The reconciler's application factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from libs.common.broker.consumer import Handler
from libs.common.broker.topology import Topology
from libs.common.messages import Envelope, ReconciliationRequested
from libs.common.reconciler_store import INBOX
from libs.common.settings import ReconcilerSettings
from libs.common.shutdown import stop_task
from libs.common.web import (
    DATABASE,
    PROVIDER,
    background_context,
    broker_context,
    consumer_context,
    create_service_app,
    database_context,
    provider_client_context,
)
from services.reconciler.runs import Reconciler, RunPolicy
from services.reconciler.schedule import measure_backlog, run_on_schedule

RECONCILER = web.AppKey("reconciler", Reconciler)
BACKLOG_GAUGE = web.AppKey("backlog_gauge", asyncio.Task[None])
BACKLOG_INTERVAL_SECONDS = 15.0


def _on_request(app: web.Application) -> Handler[ReconciliationRequested]:
    async def handle(envelope: Envelope[ReconciliationRequested]) -> None:
        request = envelope.payload
        # The run claims the message when it records itself as over: seen, it ran.
        if await app[DATABASE].statement(lambda conn: INBOX.seen(conn, envelope)):
            return
        await app[RECONCILER].run(trigger=request.trigger, run_id=request.run_id, request=envelope)

    return handle


def create_app(
    settings: ReconcilerSettings, *, topology: Topology | None = None
) -> web.Application:
    """`topology` lets tests isolate their queues; services use the default."""
    app = create_service_app()
    policy = RunPolicy(
        min_age_seconds=settings.reconcile_min_age_seconds,
        resubmit_max_age_seconds=settings.reconcile_resubmit_max_age_seconds,
        batch_size=settings.reconcile_batch_size,
        concurrency=settings.reconcile_concurrency,
    )

    async def reconciler(app: web.Application) -> AsyncIterator[None]:
        app[RECONCILER] = Reconciler(app[DATABASE], app[PROVIDER], policy)
        yield

    async def scheduler(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(
            run_on_schedule(
                settings.effective_reconcile_cron, lambda: app[RECONCILER].run(trigger="cron")
            ),
            name="reconciliation schedule",
        )
        yield
        await stop_task(task, settings.shutdown_timeout_seconds, "reconciliation schedule")

    app.cleanup_ctx.append(database_context(settings))
    app.cleanup_ctx.append(broker_context(settings, name="reconciler", topology=topology))
    app.cleanup_ctx.append(provider_client_context(settings))
    app.cleanup_ctx.append(reconciler)
    app.cleanup_ctx.append(scheduler)
    app.cleanup_ctx.append(
        background_context(
            BACKLOG_GAUGE,
            "backlog gauge",
            lambda: measure_backlog(app[DATABASE]),
            batch_size=1,
            interval=BACKLOG_INTERVAL_SECONDS,
        )
    )
    app.cleanup_ctx.append(
        consumer_context(
            lambda topology: topology.reconciliation_requested,
            ReconciliationRequested,
            _on_request,
        )
    )
    return app
