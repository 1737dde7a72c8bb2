"""What a provider's webhook says, read from its verified raw bytes.

The payload is the seed project's shape, which the simulated provider also sends:

    {"event_id": "evt_…", "event_type": "payment.completed", "payment_id": "<uuid>",
     "provider": "simulated", "data": {"reference": "PAY-…", "provider_reference": "ch_…"}}

`event_id` is optional: without it the event is identified by the SHA-256 of the body,
so resending the same file is recognised as a duplicate. Each event gets a stable UUID
derived from (provider, provider event id); the gateway returns it and
`GET /api/webhooks/{event_id}` finds the event by it.

Bytes after the JSON object are ignored (and noted): the signature already covers every
byte, and the seed's documented `payload.json` ends in a stray `1`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from libs.common.json_body import JsonError, parse_object
from libs.common.states import PaymentStatus

# The status each event type moves a payment to; other types are recorded and ignored.
EVENT_TARGETS = {
    "payment.processing": PaymentStatus.PROCESSING,
    "payment.completed": PaymentStatus.COMPLETED,
    "payment.failed": PaymentStatus.FAILED,
    "payment.refunded": PaymentStatus.REFUNDED,
}
# Events about one of a payment's refunds (data.refund_id names it): they settle the
# refund, which moves the payment (libs.common.refunds.settle_refund). True: succeeded.
REFUND_EVENTS = {"refund.succeeded": True, "refund.failed": False}
_EVENT_NAMESPACE = uuid.UUID("0b6f2a54-3c1e-4d7a-8f59-2e6d1c9a7b30")


class InvalidEvent(ValueError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    reference: StrictStr | None = None
    provider_reference: StrictStr | None = None
    decline_reason: StrictStr | None = None
    # Refund events: our refund id, the provider's, and why it failed.
    refund_id: StrictStr | None = None
    provider_refund_id: StrictStr | None = None
    failure_reason: StrictStr | None = None


class _Payload(BaseModel):
    # Providers add fields over time; unknown ones are kept in the raw body, not refused.
    model_config = ConfigDict(extra="allow", frozen=True)

    event_type: StrictStr = Field(min_length=1, max_length=100)
    payment_id: StrictStr = Field(min_length=1, max_length=100)
    provider: StrictStr = Field(default="unknown", min_length=1, max_length=100)
    event_id: StrictStr | None = Field(default=None, min_length=1, max_length=255)
    data: _Data = Field(default_factory=_Data)


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderEvent:
    id: uuid.UUID
    provider: str
    provider_event_id: str
    event_type: str
    claimed_payment_id: str
    reference: str | None
    provider_reference: str | None
    decline_reason: str | None
    trailing_bytes: bool
    claimed_refund_id: str | None = None
    provider_refund_id: str | None = None
    failure_reason: str | None = None

    @property
    def refund_outcome(self) -> bool | None:
        """For a refund event, whether the refund succeeded; None for other events."""
        return REFUND_EVENTS.get(self.event_type)

    @property
    def refund_id(self) -> uuid.UUID | None:
        try:
            return uuid.UUID(self.claimed_refund_id) if self.claimed_refund_id else None
        except ValueError:
            return None

    @property
    def target(self) -> PaymentStatus | None:
        return EVENT_TARGETS.get(self.event_type)

    @property
    def payment_id(self) -> uuid.UUID | None:
        try:
            return uuid.UUID(self.claimed_payment_id)
        except ValueError:
            return None


def event_uuid(provider: str, provider_event_id: str) -> uuid.UUID:
    return uuid.uuid5(_EVENT_NAMESPACE, f"{provider}\x00{provider_event_id}")


def parse_event(raw: bytes) -> ProviderEvent:
    try:
        parsed = parse_object(raw, lenient=True)
    except JsonError as exc:
        # Said after "the webhook body is not an event: " (see services.gateway.webhooks).
        raise InvalidEvent(exc.message[0].lower() + exc.message[1:].rstrip(".")) from None
    try:
        payload = _Payload.model_validate(parsed.value)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidEvent(f"{where}: {first['msg']}") from None
    provider_event_id = payload.event_id or "sha256:" + hashlib.sha256(raw).hexdigest()
    return ProviderEvent(
        id=event_uuid(payload.provider, provider_event_id),
        provider=payload.provider,
        provider_event_id=provider_event_id,
        event_type=payload.event_type,
        claimed_payment_id=payload.payment_id,
        reference=payload.data.reference,
        provider_reference=payload.data.provider_reference,
        decline_reason=payload.data.decline_reason,
        trailing_bytes=parsed.trailing_bytes,
        claimed_refund_id=payload.data.refund_id,
        provider_refund_id=payload.data.provider_refund_id,
        failure_reason=payload.data.failure_reason,
    )
