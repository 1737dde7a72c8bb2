"""The provider service's application factory.

Besides its API, the simulated PSP runs two background loops, each in its own cleanup
context: settlement (processing charges and refunds reach their final status and queue
a webhook)
and webhook delivery. On shutdown aiohttp unwinds the contexts in reverse: the loops are
cancelled first, then the HTTP client and the pool close. Whatever a loop was doing is
either committed or rolled back, and anything left unfinished is picked up again on the
next start (by this replica or another), because all state lives in the database.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from libs.common.settings import ProviderSettings
from libs.common.shutdown import bounded
from libs.common.web import (
    DATABASE,
    CleanupContext,
    background_context,
    create_service_app,
    database_context,
    shutdown_timeout,
)
from services.provider import refunds
from services.provider.charges import SETTLE_BATCH_SIZE, settle_due
from services.provider.deliveries import DELIVERY_BATCH_SIZE, WebhookTarget, deliver_due
from services.provider.keys import (
    DELIVERY_TASK,
    SETTLEMENT_TASK,
    SIMULATION,
    WAKEUPS,
    WEBHOOK_CLIENT,
)
from services.provider.routes import add_routes
from services.provider.simulation import Simulation
from services.provider.wakeups import Wakeups

log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 0.1


def create_app(settings: ProviderSettings) -> web.Application:
    app = create_service_app()
    app[SIMULATION] = Simulation.from_settings(settings)
    app[WAKEUPS] = wakeups = Wakeups()
    add_routes(app)
    target = WebhookTarget(
        url=settings.provider_webhook_url,
        secrets=[secret.get_secret_value() for secret in settings.webhook_secret],
        timeout_seconds=settings.provider_webhook_timeout_seconds,
    )
    app.cleanup_ctx.append(database_context(settings))
    app.cleanup_ctx.append(webhook_client_context())
    app.cleanup_ctx.append(
        background_context(
            SETTLEMENT_TASK,
            "settlement",
            lambda: _settle_charges_and_refunds(app),
            batch_size=SETTLE_BATCH_SIZE,
            interval=POLL_INTERVAL_SECONDS,
            wake=wakeups.settlement,
        )
    )
    app.cleanup_ctx.append(
        background_context(
            DELIVERY_TASK,
            "webhook delivery",
            lambda: deliver_due(
                app[DATABASE],
                app[WEBHOOK_CLIENT],
                app[SIMULATION],
                target,
                batch_size=DELIVERY_BATCH_SIZE,
            ),
            batch_size=DELIVERY_BATCH_SIZE,
            interval=POLL_INTERVAL_SECONDS,
            wake=wakeups.delivery,
        )
    )
    return app


async def _settle_charges_and_refunds(app: web.Application) -> int:
    # One loop for both: "a full batch" of either means more is due already.
    charges = await settle_due(app[DATABASE], app[SIMULATION], batch_size=SETTLE_BATCH_SIZE)
    settled = await refunds.settle_due(app[DATABASE], app[SIMULATION], batch_size=SETTLE_BATCH_SIZE)
    if charges or settled:
        app[WAKEUPS].deliver_now()  # each settlement queued its webhook
    return max(charges, settled)


def webhook_client_context() -> CleanupContext:
    async def context(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession()
        app[WEBHOOK_CLIENT] = session
        yield
        await bounded(session.close(), shutdown_timeout(app), "close webhook client")

    return context
