"""paymentsctl refund, refunds and cancel against the fake gateway of test_paymentsctl."""

from __future__ import annotations

import json

from tests.unit.test_paymentsctl import (
    EVENTS,
    PAYMENT,
    PAYMENT_ID,
    FakeGateway,
    ctl,
    gateway,
    operator_environment,
)

__all__ = ["gateway", "operator_environment"]

REFUND_ID = "0c9a3a4e-2f6b-4d0e-9a51-7b1e2c3d4f50"
REFUND = {
    "id": REFUND_ID,
    "payment_id": PAYMENT_ID,
    "amount": "25.00",
    "currency": "USD",
    "reason": "paid twice",
    "status": "pending",
    "failure_reason": None,
    "provider_refund_id": None,
    "created_at": "2026-12-01T09:00:00+00:00",
    "updated_at": "2026-12-01T09:00:00+00:00",
    "settled_at": None,
}


def test_refund_sends_the_amount_as_a_string_with_its_key(gateway: FakeGateway) -> None:
    gateway.answer("POST", f"/api/payments/{PAYMENT_ID}/refunds", 202, REFUND)
    result = ctl(
        *("--url", gateway.url, "refund", PAYMENT_ID, "--amount", "25.00"),
        *("--reason", "paid twice", "--idempotency-key", "r-1"),
    )
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("refund accepted\n")
    assert REFUND_ID in result.stdout
    [sent] = gateway.received
    assert json.loads(sent.body) == {"amount": "25.00", "reason": "paid twice"}
    assert sent.headers["Idempotency-Key"] == "r-1"


def test_refund_without_an_amount_sends_an_empty_object(gateway: FakeGateway) -> None:
    gateway.answer("POST", f"/api/payments/{PAYMENT_ID}/refunds", 202, REFUND)
    assert ctl("--url", gateway.url, "--json", "refund", PAYMENT_ID).json() == REFUND
    assert json.loads(gateway.received[0].body) == {}


def test_a_refused_refund_exits_1_with_the_code(gateway: FakeGateway) -> None:
    refusal = {"error": "payment_not_refundable", "message": "Payment x is pending; ..."}
    gateway.answer("POST", f"/api/payments/{PAYMENT_ID}/refunds", 409, refusal)
    result = ctl("--url", gateway.url, "refund", PAYMENT_ID, "--amount", "1")
    assert result.code == 1
    assert "payment_not_refundable" in result.stderr


def test_refunds_list_and_get(gateway: FakeGateway) -> None:
    gateway.answer("GET", f"/api/payments/{PAYMENT_ID}/refunds", 200, {"data": [REFUND]})
    gateway.answer("GET", f"/api/refunds/{REFUND_ID}", 200, REFUND)
    listed = ctl("--url", gateway.url, "refunds", "list", PAYMENT_ID)
    one = ctl("--url", gateway.url, "refunds", "get", REFUND_ID)
    assert listed.code == one.code == 0
    assert REFUND_ID in listed.stdout
    assert "25.00" in listed.stdout
    assert "paid twice" in one.stdout
    assert ctl("--url", gateway.url, "refunds", "get", "stats").code == 2


def test_cancel_prints_the_canceled_payment(gateway: FakeGateway) -> None:
    canceled = {**PAYMENT, "status": "canceled", "events": EVENTS}
    gateway.answer("POST", f"/api/payments/{PAYMENT_ID}/cancel", 200, canceled)
    result = ctl("--url", gateway.url, "cancel", PAYMENT_ID)
    assert result.code == 0, result.stderr
    assert "canceled" in result.stdout
    assert gateway.received[0].method == "POST"
