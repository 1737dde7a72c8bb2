"""The provider service's application factory."""

from aiohttp import web

from libs.common.settings import ProviderSettings
from libs.common.web import create_service_app, database_context


def create_app(settings: ProviderSettings) -> web.Application:
    app = create_service_app(settings)
    app.cleanup_ctx.append(database_context(settings))
    return app
