"""The gateway's application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from libs.common.broker.topology import Topology
from libs.common.settings import GatewaySettings
from libs.common.web import DATABASE, broker_context, create_service_app, database_context
from services.gateway.idempotency import IdempotencyKeys
from services.gateway.routes import IDEMPOTENCY_KEYS, add_routes

log = logging.getLogger(__name__)

PURGE_INTERVAL_SECONDS = 600


async def _idempotency_keys(app: web.Application) -> AsyncIterator[None]:
    keys = IdempotencyKeys(app[DATABASE])
    app[IDEMPOTENCY_KEYS] = keys

    async def purge_forever() -> None:
        while True:
            try:
                purged = await keys.purge_expired()
                if purged:
                    log.info("expired idempotency keys purged", extra={"count": purged})
            except Exception:
                log.warning("idempotency key purge failed", exc_info=True)
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)

    purger = asyncio.create_task(purge_forever(), name="idempotency-key-purge")
    yield
    purger.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await purger


def create_app(settings: GatewaySettings, *, topology: Topology | None = None) -> web.Application:
    """`topology` lets tests isolate their queues; services use the default."""
    app = create_service_app(settings)
    app.cleanup_ctx.append(database_context(settings))
    app.cleanup_ctx.append(broker_context(settings, name="gateway", topology=topology))
    app.cleanup_ctx.append(_idempotency_keys)
    add_routes(app)
    return app
