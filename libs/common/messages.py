"""Messages on the bus: one envelope, typed payloads, JSON on the wire (never pickle).

Every message's `type` is also its routing key: a command's is fixed by its payload
class, an event's follows from its payload (`payment.<new status>`). `message_id` is the
consumer's dedupe key; `correlation_id` carries the originating request's id into every
log line the message causes. A payload's `VERSION` is bumped on an incompatible change,
and consumers refuse (park) versions they do not know instead of guessing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

from pydantic import AwareDatetime, Base64Bytes, BaseModel, ConfigDict, Field, ValidationError

from libs.common.logs import get_correlation_id, new_correlation_id
from libs.common.states import PaymentStatus, TransitionSource


class Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1

    def message_type(self) -> str:
        """This message's `type` and routing key."""
        return self.TYPE


P = TypeVar("P", bound=Payload)


class Envelope(BaseModel, Generic[P]):
    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: uuid.UUID
    type: str
    version: int
    occurred_at: AwareDatetime
    correlation_id: str
    payload: P

    @property
    def routing_key(self) -> str:
        return self.type


# Envelope[X] costs a few microseconds on every call even when pydantic has the class
# cached, and every message published or consumed asks for one; payload types are few.
_ENVELOPE_TYPES: dict[type[Payload], type[Envelope[Any]]] = {}


def envelope_type(payload_type: type[P]) -> type[Envelope[P]]:
    """`Envelope[payload_type]`, for a payload type known only at run time.

    Pydantic must know the concrete payload type to validate and serialise all its fields."""
    envelope = _ENVELOPE_TYPES.get(payload_type)
    if envelope is None:
        envelope = cast("type[Envelope[Any]]", Envelope.__class_getitem__(payload_type))
        _ENVELOPE_TYPES[payload_type] = envelope
    return cast("type[Envelope[P]]", envelope)


class MessageDecodeError(ValueError):
    """The bytes are not a message this consumer understands; retrying cannot help."""


def wrap(
    payload: P, *, message_id: uuid.UUID | None = None, correlation_id: str | None = None
) -> Envelope[P]:
    """Put `payload` in an envelope stamped now, under the current correlation id."""
    return envelope_type(type(payload))(
        message_id=message_id or uuid.uuid4(),
        type=payload.message_type(),
        version=payload.VERSION,
        occurred_at=dt.datetime.now(dt.UTC),
        correlation_id=correlation_id or get_correlation_id() or new_correlation_id(),
        payload=payload,
    )


def encode(envelope: Envelope[Any]) -> bytes:
    return envelope.model_dump_json().encode()


def decode(body: bytes, payload_type: type[P]) -> Envelope[P]:
    try:
        envelope = envelope_type(payload_type).model_validate_json(body)
    except ValidationError as exc:
        raise MessageDecodeError(f"not a valid {payload_type.TYPE} message: {exc}") from exc
    if envelope.type != envelope.payload.message_type():
        raise MessageDecodeError(
            f"expected a {envelope.payload.message_type()} message, got {envelope.type}"
        )
    if envelope.version != payload_type.VERSION:
        raise MessageDecodeError(
            f"{envelope.type} version {envelope.version} is not supported"
            f" (this consumer reads version {payload_type.VERSION})"
        )
    return envelope


# --- the platform's messages ------------------------------------------------------------------


class PaymentRequested(Payload):
    """A client asked to pay; the gateway accepted it. Consumed by the payments service."""

    TYPE: ClassVar[str] = "payment.requested"

    payment_id: uuid.UUID
    reference: str = Field(min_length=1, max_length=64)
    amount_minor: int = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    customer_id: str = Field(min_length=1, max_length=128)
    description: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    requested_at: AwareDatetime
    # The API key that asked (its id): only it may refund or cancel the payment. Absent
    # from messages of gateways that predate it.
    owner: str | None = Field(default=None, max_length=64)


class WebhookReceived(Payload):
    """A provider callback the gateway verified. Consumed by the webhooks service."""

    TYPE: ClassVar[str] = "webhook.received"

    raw_body: Base64Bytes
    headers: dict[str, str]
    signature_scheme: Literal["seed", "standard"]
    received_at: AwareDatetime
    verified_at: AwareDatetime


class ReconciliationRequested(Payload):
    """Someone asked for a reconciliation run now. Consumed by the reconciler."""

    TYPE: ClassVar[str] = "reconciliation.requested"

    run_id: uuid.UUID
    trigger: Literal["cron", "manual"] = "manual"


class RefundRequested(Payload):
    """A client asked for a refund; the gateway stored it as pending, under its payment's
    lock, within what is left to refund. Consumed by the payments service, which submits
    it to the provider. The refund's row is the truth; this only says "submit it"."""

    TYPE: ClassVar[str] = "refund.requested"

    refund_id: uuid.UUID
    payment_id: uuid.UUID
    requested_at: AwareDatetime


# --- the platform's events --------------------------------------------------------------------

PAYMENT_EVENT_PREFIX = "payment."


def payment_event_type(status: PaymentStatus) -> str:
    """The type and routing key of the event a move to `status` publishes."""
    return PAYMENT_EVENT_PREFIX + status.value


class PaymentEvent(Payload):
    """A payment transition that was applied: the payment as it became, and how.

    Published as `payment.<status>` for every status, so a status added to the lifecycle
    gets its event with no change here. `sequence` counts one payment's events from 1
    without gaps: a consumer orders them by it and deduplicates on `message_id`.
    """

    # The pattern; each message's own type is payment.<status> (see message_type).
    TYPE: ClassVar[str] = PAYMENT_EVENT_PREFIX + "*"

    payment_id: uuid.UUID
    sequence: int = Field(ge=1)
    status: PaymentStatus
    # None for the first event, the payment's creation.
    previous_status: PaymentStatus | None
    source: TransitionSource
    reason: str | None
    reference: str
    amount_minor: int = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    customer_id: str
    description: str | None
    metadata: dict[str, Any]
    provider: str | None
    provider_reference: str | None
    failure_reason: str | None
    created_at: AwareDatetime
    updated_at: AwareDatetime

    def message_type(self) -> str:
        return payment_event_type(self.status)


# Every payload class on the bus (the AsyncAPI document describes each of them).
COMMANDS: tuple[type[Payload], ...] = (
    PaymentRequested,
    WebhookReceived,
    ReconciliationRequested,
    RefundRequested,
)
EVENTS: tuple[type[Payload], ...] = (PaymentEvent,)
