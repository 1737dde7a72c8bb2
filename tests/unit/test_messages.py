"""The envelope: what goes on the wire, and what a consumer refuses."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid

import pytest

from libs.common.logs import correlation_scope
from libs.common.messages import (
    MessageDecodeError,
    PaymentRequested,
    WebhookReceived,
    decode,
    encode,
    wrap,
)

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def payment() -> PaymentRequested:
    return PaymentRequested(
        payment_id=uuid.UUID(int=1),
        reference="PAY-1",
        amount_minor=10000,
        currency="USD",
        customer_id="test_customer",
        description="Test payment from DevOps",
        metadata={"invoice": "INV-7"},
        requested_at=NOW,
    )


def test_envelope_carries_the_contract_fields() -> None:
    with correlation_scope("req-42"):
        envelope = wrap(payment())
    wire = json.loads(encode(envelope))
    assert set(wire) == {
        "message_id",
        "type",
        "version",
        "occurred_at",
        "correlation_id",
        "payload",
    }
    assert wire["type"] == "payment.requested"
    assert wire["version"] == 1
    assert wire["correlation_id"] == "req-42"
    assert uuid.UUID(wire["message_id"])
    assert dt.datetime.fromisoformat(wire["occurred_at"]).tzinfo is not None
    assert wire["payload"]["metadata"] == {"invoice": "INV-7"}


def test_round_trip_keeps_every_field() -> None:
    envelope = wrap(payment())
    assert decode(encode(envelope), PaymentRequested) == envelope


def test_raw_webhook_bytes_survive_the_trip_exactly() -> None:
    raw = b'{"event_type":"payment.completed"}1\n\xff'
    envelope = wrap(
        WebhookReceived(
            raw_body=base64.b64encode(raw),
            headers={"x-webhook-signature": "ab"},
            signature_scheme="seed",
            received_at=NOW,
            verified_at=NOW,
        )
    )
    assert decode(encode(envelope), WebhookReceived).payload.raw_body == raw


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (lambda w: w.update(type="webhook.received"), "expected a payment.requested"),
        (lambda w: w.update(version=2), "version 2 is not supported"),
        (lambda w: w["payload"].update(amount_minor=0), "not a valid payment.requested"),
        (lambda w: w["payload"].update(surprise=1), "not a valid payment.requested"),
        (lambda w: w.update(occurred_at="2026-11-26T12:00:00"), "not a valid"),
        (lambda w: w.pop("message_id"), "not a valid"),
    ],
)
def test_decode_refuses_what_it_does_not_understand(mutate: object, complaint: str) -> None:
    wire = json.loads(encode(wrap(payment())))
    mutate(wire)  # type: ignore[operator]
    with pytest.raises(MessageDecodeError, match=complaint):
        decode(json.dumps(wire).encode(), PaymentRequested)


def test_decode_refuses_bytes_that_are_not_json() -> None:
    with pytest.raises(MessageDecodeError):
        decode(b"\x80\x04pickle?", PaymentRequested)
