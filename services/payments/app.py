"""The payments service's application factory."""

from aiohttp import web

from libs.common.broker.topology import Topology
from libs.common.messages import PaymentRequested
from libs.common.settings import PaymentsSettings
from libs.common.web import (
    DATABASE,
    PROVIDER,
    broker_context,
    consumer_context,
    create_service_app,
    database_context,
    provider_client_context,
)
from services.payments.charging import PaymentIntake


def _intake(app: web.Application) -> PaymentIntake:
    return PaymentIntake(app[DATABASE], app[PROVIDER])


def create_app(settings: PaymentsSettings, *, topology: Topology | None = None) -> web.Application:
    """`topology` lets tests isolate their queues; services use the default."""
    app = create_service_app()
    app.cleanup_ctx.append(database_context(settings))
    app.cleanup_ctx.append(broker_context(settings, name="payments", topology=topology))
    app.cleanup_ctx.append(provider_client_context(settings))
    app.cleanup_ctx.append(
        consumer_context(
            lambda topology: topology.payment_requested,
            PaymentRequested,
            lambda app: _intake(app).handle,
            make_batch_handler=lambda app: _intake(app).handle_batch,
        )
    )
    return app
