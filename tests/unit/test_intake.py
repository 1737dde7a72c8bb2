"""What the gateway makes of an accepted payment, without a broker or a database."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import uuid

import pytest

from libs.common.logs import correlation_scope
from libs.common.messages import PaymentRequested, decode, encode, envelope_type
from services.gateway.intake import (
    accepted_body,
    message_id,
    new_reference,
    payment_requested,
)
from services.gateway.validation import parse_payment_order

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
REFERENCE = re.compile(r"^PAY-[0-9A-HJKMNP-TV-Z]{10}$")


def test_a_reference_spells_its_50_random_bits_in_crockford_base32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    digits = [1, 2, 3, 4, 5, 6, 7, 8, 9, 31]
    bits = sum(digit << (5 * (9 - i)) for i, digit in enumerate(digits))
    monkeypatch.setattr(secrets, "randbits", lambda k: bits if k == 50 else pytest.fail(str(k)))
    assert new_reference() == "PAY-123456789Z"


def test_references_use_the_whole_alphabet_in_every_position() -> None:
    references = [new_reference() for _ in range(2000)]
    assert all(REFERENCE.match(reference) for reference in references)
    assert len(set(references)) == len(references)
    for position in range(4, 14):
        assert {reference[position] for reference in references} == set(CROCKFORD)


# The namespace payment.requested's message ids have always been derived in.
NAMESPACE = uuid.UUID("6f1c3a52-8a8e-4d8f-9a43-5b0f7c2d9e11")


def test_the_message_id_is_uuid5_of_the_payment_id() -> None:
    for payment_id in [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)] + [
        uuid.uuid4() for _ in range(1000)
    ]:
        derived = message_id(payment_id)
        assert derived == uuid.uuid5(NAMESPACE, str(payment_id))
        assert (derived.version, derived.variant) == (5, uuid.RFC_4122)


@pytest.mark.parametrize(
    "order",
    [
        {"amount": "100.00", "customer_id": "test_customer"},
        {
            "amount": "1234.5",
            "currency": "EUR",
            "customer_id": "c-ü",
            "description": 'Rent "March" \u2603',
            "metadata": {"invoice": "INV-7", "note": "ä\n"},
        },
        {"amount": "500", "currency": "JPY", "customer_id": "c", "description": None},
    ],
)
def test_the_message_is_what_a_validated_envelope_would_say(order: dict[str, object]) -> None:
    payment = parse_payment_order(order)
    body = accepted_body(payment)
    with correlation_scope("req-42"):
        envelope = payment_requested(payment, body)
    payment_id = uuid.UUID(body["id"])
    validated = envelope_type(PaymentRequested)(
        message_id=uuid.uuid5(NAMESPACE, str(payment_id)),
        type="payment.requested",
        version=1,
        occurred_at=envelope.occurred_at,
        correlation_id="req-42",
        payload=PaymentRequested(
            payment_id=payment_id,
            reference=body["reference"],
            amount_minor=payment.amount_minor,
            currency=payment.currency,
            customer_id=payment.customer_id,
            description=payment.description,
            metadata=payment.metadata,
            requested_at=dt.datetime.fromisoformat(body["created_at"]),
        ),
    )
    assert encode(envelope) == encode(validated)
    assert decode(encode(envelope), PaymentRequested) == envelope == validated
