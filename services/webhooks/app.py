"""The webhooks service's application factory."""

from __future__ import annotations

import asyncio

from aiohttp import web

from libs.common.broker.topology import Topology
from libs.common.messages import WebhookReceived
from libs.common.settings import WebhooksSettings
from libs.common.web import (
    DATABASE,
    background_context,
    broker_context,
    consumer_context,
    create_service_app,
    database_context,
)
from services.webhooks.handling import WebhookIntake, retry_orphans

ORPHAN_SWEEP_INTERVAL_SECONDS = 0.5
ORPHAN_SWEEP_BATCH = 100
ORPHAN_SWEEP = web.AppKey("orphan_sweep", asyncio.Task[None])


def create_app(settings: WebhooksSettings, *, topology: Topology | None = None) -> web.Application:
    """`topology` lets tests isolate their queues; services use the default."""
    app = create_service_app()
    app.cleanup_ctx.append(database_context(settings))
    app.cleanup_ctx.append(broker_context(settings, name="webhooks", topology=topology))
    app.cleanup_ctx.append(
        consumer_context(
            lambda topology: topology.webhook_received,
            WebhookReceived,
            lambda app: WebhookIntake(app[DATABASE]).handle,
            make_batch_handler=lambda app: WebhookIntake(app[DATABASE]).handle_batch,
            # One batch at a time: what arrives while it runs makes the next, fuller one
            # (docs/decisions/0001-performance.md).
            batches_in_flight=1,
        )
    )
    app.cleanup_ctx.append(
        background_context(
            ORPHAN_SWEEP,
            "orphan webhook retry",
            lambda: retry_orphans(app[DATABASE], batch_size=ORPHAN_SWEEP_BATCH),
            batch_size=ORPHAN_SWEEP_BATCH,
            interval=ORPHAN_SWEEP_INTERVAL_SECONDS,
        )
    )
    return app
