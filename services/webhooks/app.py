"""The webhooks service's application factory."""

from aiohttp import web

from libs.common.settings import WebhooksSettings
from libs.common.web import broker_context, create_service_app, database_context


def create_app(settings: WebhooksSettings) -> web.Application:
    app = create_service_app(settings)
    app.cleanup_ctx.append(database_context(settings))
    app.cleanup_ctx.append(broker_context(settings, name="webhooks"))
    return app
