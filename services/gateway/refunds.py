"""Refunds and cancels at the edge: validate, store through libs.common, publish, answer.

`POST /api/payments/{id}/refunds` stores the refund as pending first (under its payment's
lock, within what is left to refund: libs.common.refunds.create_refund), then publishes
refund.requested and answers 202 only once the broker confirmed it. If the broker does
not confirm, the refund is withdrawn again (unless the payments service already took
it, then it goes on) and the answer is 503: the client retries, with its
Idempotency-Key the same refund. A gateway that dies between the two leaves a pending
refund the broker never got: the reconciler submits it once it is old enough.

`Idempotency-Key` works as for /pay and through the same module: the refund's id is fixed
when the key is first claimed, so a retry after a crash is the same refund again. An
answer that refuses the refund (4xx) is not kept: the key is free again, nothing stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from decimal import Decimal
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from libs.common.broker.publisher import PublishError
from libs.common.db import Database
from libs.common.errors import ApiError, service_unavailable
from libs.common.messages import RefundRequested, wrap
from libs.common.refunds import NewRefund, create_refund, refund_json, withdraw
from libs.common.tables import REFUND_REASON_MAX_LENGTH
from services.gateway.idempotency import IdempotencyKeys, Replay
from services.gateway.intake import Publish
from services.gateway.validation import _amount, _sentence, known_currency

log = logging.getLogger(__name__)

# refund.requested's message id is derived from the refund id: publishing one refund
# twice (a retry) is one message to the consumer.
_MESSAGE_NAMESPACE = uuid.UUID("2d0b5f3e-71c4-4a8e-9c1d-6b3e8f0a4c27")


class RefundOrder(BaseModel):
    """A valid `POST /api/payments/{id}/refunds` body (every field optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: refund what is left.
    amount: Decimal | None = None
    # When given, it must be the payment's (checked against the payment).
    currency: StrictStr | None = None
    reason: StrictStr | None = None

    @field_validator("amount", mode="before")
    @classmethod
    def _parse_amount(cls, value: object) -> Decimal | None:
        if value is None:
            return None
        amount = _amount(value)
        if amount <= 0:
            raise PydanticCustomError("invalid_amount", "amount must be greater than zero")
        return amount

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str | None) -> str | None:
        return None if value is None else known_currency(value)

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str | None) -> str | None:
        if value is not None and (
            not 1 <= len(value) <= REFUND_REASON_MAX_LENGTH or not value.isprintable()
        ):
            raise PydanticCustomError(
                "invalid_reason",
                f"reason must be 1 to {REFUND_REASON_MAX_LENGTH} printable characters",
            )
        return value

    def fingerprint(self, payment_id: uuid.UUID) -> str:
        """Equal for two requests that ask for the same refund of the same payment."""
        canonical = json.dumps(
            {
                "operation": "refund",
                "payment_id": str(payment_id),
                # 10.0 and 10.00 are the same amount.
                "amount": None if self.amount is None else str(self.amount.normalize()),
                "currency": self.currency,
                "reason": self.reason,
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


_GENERIC_CODES = {"extra_forbidden": "unknown_field"}


def parse_refund_order(body: dict[str, Any]) -> RefundOrder:
    try:
        return RefundOrder.model_validate(body)
    except ValidationError as exc:
        details = []
        for error in exc.errors(include_url=False, include_input=False):
            kind = error["type"]
            loc = error["loc"]
            field = ".".join(str(part) for part in loc) or "body"
            code = _GENERIC_CODES.get(kind) or (
                kind if kind.startswith(("invalid_", "amount_")) else f"invalid_{field}"
            )
            message = error["msg"].rstrip(".")
            if code == "unknown_field":
                message = "not a field of a refund request"
            details.append({"field": field, "code": code, "message": message})
        first = details[0]
        raise ApiError(
            422, first["code"], _sentence(first["field"], first["message"]), details=details
        ) from None


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]
    replayed: bool = False


def refund_requested_message_id(refund_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(_MESSAGE_NAMESPACE, str(refund_id))


async def request_refund(
    db: Database,
    payment_id: uuid.UUID,
    order: RefundOrder,
    *,
    owner: str,
    publish: Publish,
    keys: IdempotencyKeys,
    idempotency_key: str | None,
) -> Answer:
    prepared: dict[str, Any] = {"id": str(uuid.uuid4())}
    if idempotency_key is not None:
        claim = await keys.claim(owner, idempotency_key, order.fingerprint(payment_id), prepared)
        if isinstance(claim, Replay):
            return Answer(claim.status, claim.body, replayed=True)
        prepared = claim.body
    refund_id = uuid.UUID(prepared["id"])
    try:
        created = await create_refund(
            db,
            NewRefund(
                refund_id=refund_id,
                payment_id=payment_id,
                owner=owner,
                amount=order.amount,
                reason=order.reason,
                currency=order.currency,
            ),
        )
    except ApiError:
        if idempotency_key is not None:
            await keys.forget(owner, idempotency_key)
        raise
    except BaseException:
        if idempotency_key is not None:
            await keys.release(owner, idempotency_key)
        raise

    try:
        await publish(
            wrap(
                RefundRequested(
                    refund_id=refund_id,
                    payment_id=payment_id,
                    requested_at=created.refund["created_at"],
                ),
                message_id=refund_requested_message_id(refund_id),
            )
        )
    except PublishError as exc:
        log.warning(
            "refund not accepted: broker did not confirm",
            extra={"refund_id": str(refund_id), "error": str(exc)},
        )
        if not await withdraw(db, refund_id):
            # The payments service got it after all and submitted it: it goes on.
            body = refund_json(created.refund)
            if idempotency_key is not None:
                await keys.complete(owner, idempotency_key, 202, body)
            return Answer(202, body)
        if idempotency_key is not None:
            await keys.release(owner, idempotency_key)
        raise service_unavailable(
            "broker_unavailable", "The refund was not accepted; retry in a moment."
        ) from exc

    body = refund_json(created.refund)
    if idempotency_key is not None:
        await keys.complete(owner, idempotency_key, 202, body)
    log.info(
        "refund accepted",
        extra={
            "refund_id": str(refund_id),
            "payment_id": str(payment_id),
            "amount": body["amount"],
            "currency": body["currency"],
        },
    )
    return Answer(202, body)
