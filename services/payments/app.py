"""The payments service's application factory."""

from aiohttp import web

from libs.common.broker.topology import Topology
from libs.common.messages import PaymentRequested, RefundRequested
from libs.common.outbox import OutboxRelay, relay_context
from libs.common.settings import PaymentsSettings
from libs.common.web import (
    BROKER,
    DATABASE,
    PROVIDER,
    broker_context,
    consumer_context,
    create_service_app,
    database_context,
    provider_client_context,
)
from services.payments.charging import PaymentIntake
from services.payments.refunding import RefundSubmission


def _intake(app: web.Application) -> PaymentIntake:
    return PaymentIntake(app[DATABASE], app[PROVIDER])


def _relay(app: web.Application, settings: PaymentsSettings) -> OutboxRelay:
    return OutboxRelay(
        app[DATABASE],
        app[BROKER],
        batch_size=settings.outbox_batch_size,
        poll_interval=settings.outbox_poll_interval_seconds,
        retention_days=settings.event_retention_days,
    )


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
    app.cleanup_ctx.append(
        consumer_context(
            lambda topology: topology.refund_requested,
            RefundRequested,
            lambda app: RefundSubmission(app[DATABASE], app[PROVIDER]).handle,
        )
    )
    # Every replica runs the relay of payment events; one at a time relays (see
    # libs/common/outbox.py). After the consumer, so it stops first: no event is lost
    # by stopping, since what is not marked published goes out on the next round.
    app.cleanup_ctx.append(relay_context(lambda app: _relay(app, settings)))
    return app
