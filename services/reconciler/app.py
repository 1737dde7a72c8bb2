"""The reconciler service's application factory."""

from aiohttp import web

from libs.common.broker.topology import Topology
from libs.common.settings import ReconcilerSettings
from libs.common.web import broker_context, create_service_app, database_context


def create_app(
    settings: ReconcilerSettings, *, topology: Topology | None = None
) -> web.Application:
    """`topology` lets tests isolate their queues; services use the default."""
    app = create_service_app(settings)
    app.cleanup_ctx.append(database_context(settings))
    app.cleanup_ctx.append(broker_context(settings, name="reconciler", topology=topology))
    return app
