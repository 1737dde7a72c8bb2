"""The reconciler service's application factory."""

from aiohttp import web

from libs.common.settings import ReconcilerSettings
from libs.common.web import broker_context, create_service_app, database_context


def create_app(settings: ReconcilerSettings) -> web.Application:
    app = create_service_app(settings)
    app.cleanup_ctx.append(database_context(settings))
    app.cleanup_ctx.append(broker_context(settings, name="reconciler"))
    return app
