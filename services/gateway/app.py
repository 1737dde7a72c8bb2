"""The gateway's application factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from libs.common.broker.topology import Topology
from libs.common.settings import GatewaySettings
from libs.common.web import (
    ACCESS_LOG,
    DATABASE,
    background_context,
    broker_context,
    create_service_app,
    database_context,
)
from services.gateway.idempotency import IdempotencyKeys
from services.gateway.routes import GATEWAY_SETTINGS, IDEMPOTENCY_KEYS, add_routes

PURGE_INTERVAL_SECONDS = 600
PURGE_BATCH = 1000
PURGE_TASK = web.AppKey("idempotency_purge", asyncio.Task[None])


async def _idempotency_keys(app: web.Application) -> AsyncIterator[None]:
    app[IDEMPOTENCY_KEYS] = IdempotencyKeys(app[DATABASE])
    yield


def create_app(settings: GatewaySettings, *, topology: Topology | None = None) -> web.Application:
    """`topology` lets tests isolate their queues; services use the default."""
    app = create_service_app()
    app[GATEWAY_SETTINGS] = settings
    app[ACCESS_LOG] = settings.access_log
    app.cleanup_ctx.append(database_context(settings))
    app.cleanup_ctx.append(broker_context(settings, name="gateway", topology=topology))
    app.cleanup_ctx.append(_idempotency_keys)
    app.cleanup_ctx.append(
        background_context(
            PURGE_TASK,
            "idempotency key purge",
            lambda: app[IDEMPOTENCY_KEYS].purge_expired(batch=PURGE_BATCH),
            batch_size=PURGE_BATCH,
            interval=PURGE_INTERVAL_SECONDS,
        )
    )
    add_routes(app)
    return app
