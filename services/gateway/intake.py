"""Accepting a payment: publish `payment.requested`, answer only once the broker has it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from libs.common.broker.publisher import PublishError
from libs.common.errors import service_unavailable
from libs.common.messages import Envelope, PaymentRequested, wrap
from libs.common.money import format_minor_units
from libs.common.states import PaymentStatus
from services.gateway.idempotency import IdempotencyKeys, Replay
from services.gateway.validation import PaymentOrder

log = logging.getLogger(__name__)

Publish = Callable[[Envelope[Any]], Awaitable[None]]

# Crockford's base32 alphabet: no I, L, O or U to misread over the phone.
_REFERENCE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# payment.requested's message id is derived from the payment id, so publishing one
# payment twice (a retry after a crash) is one message to the consumer's inbox.
_MESSAGE_NAMESPACE = uuid.UUID("6f1c3a52-8a8e-4d8f-9a43-5b0f7c2d9e11")


def new_reference() -> str:
    """A human-friendly unique reference, e.g. PAY-7K2M9Q4XTR (50 random bits).

    One random draw spelled five bits a character, not ten calls to secrets.choice (each
    a system random read) on every payment."""
    bits = secrets.randbits(50)
    return "PAY-" + "".join(
        _REFERENCE_ALPHABET[(bits >> shift) & 31] for shift in range(45, -5, -5)
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    body: dict[str, Any]
    replayed: bool = False
    status: int = 202


def accepted_body(order: PaymentOrder) -> dict[str, Any]:
    """The answer to a new payment: what GET /api/payments/{id} will show, as pending."""
    return {
        "id": str(uuid.uuid4()),
        "reference": new_reference(),
        "status": PaymentStatus.PENDING.value,
        "amount": format_minor_units(order.amount_minor, order.currency),
        "currency": order.currency,
        "customer_id": order.customer_id,
        "description": order.description,
        "metadata": order.metadata,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
    }


def message_id(payment_id: uuid.UUID) -> uuid.UUID:
    """payment.requested's message id: the same for one payment in any gateway version,
    which the consumer's dedupe relies on."""
    return uuid.uuid5(_MESSAGE_NAMESPACE, str(payment_id))


def payment_requested(
    order: PaymentOrder, body: dict[str, Any], owner: str | None = None
) -> Envelope[PaymentRequested]:
    payment_id = uuid.UUID(body["id"])
    return wrap(
        PaymentRequested(
            payment_id=payment_id,
            reference=body["reference"],
            amount_minor=order.amount_minor,
            currency=order.currency,
            customer_id=order.customer_id,
            description=order.description,
            metadata=order.metadata,
            requested_at=dt.datetime.fromisoformat(body["created_at"]),
            owner=owner,
        ),
        message_id=message_id(payment_id),
    )


async def accept_payment(
    order: PaymentOrder,
    *,
    publish: Publish,
    keys: IdempotencyKeys,
    idempotency_key: str | None,
    scope: str,
) -> Accepted:
    body = accepted_body(order)
    if idempotency_key is not None:
        claim = await keys.claim(scope, idempotency_key, order.fingerprint(), body)
        if isinstance(claim, Replay):
            return Accepted(claim.body, replayed=True, status=claim.status)
        body = claim.body

    try:
        await publish(payment_requested(order, body, owner=scope))
    except PublishError as exc:
        log.warning("payment not accepted: broker did not confirm", extra={"error": str(exc)})
        if idempotency_key is not None:
            await keys.release(scope, idempotency_key)
        raise service_unavailable(
            "broker_unavailable", "The payment was not accepted; retry in a moment."
        ) from exc

    if idempotency_key is not None:
        await keys.complete(scope, idempotency_key, 202, body)
    # DEBUG: the payments service logs "payment stored" at INFO and the gateway's metrics
    # count acceptances, so an INFO line here would be a third record of the same fact,
    # paid for in the gateway's CPU on every request.
    log.debug(
        "payment accepted",
        extra={
            "payment_id": body["id"],
            "reference": body["reference"],
            "amount": body["amount"],
            "currency": body["currency"],
        },
    )
    return Accepted(body)
