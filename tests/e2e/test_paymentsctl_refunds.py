"""paymentsctl refund, refunds and cancel against the running services, end to end:
the refund goes through the bus, the payments service, the provider and its webhook."""

from __future__ import annotations

from collections.abc import Awaitable

import pytest

from tests.e2e.stack import Stack
from tests.e2e.test_paymentsctl import Ctl, ctl
from tests.support import eventually

__all__ = ["ctl"]

pytestmark = pytest.mark.e2e

FAST = {"PROVIDER_WEBHOOK_DELAY_MS": "100", "PROVIDER_DECLINE_RATE": "0"}


async def test_a_payment_refunded_in_two_parts_through_the_cli(stack: Stack, ctl: Ctl) -> None:
    await stack.start("provider", **FAST)
    await stack.start("payments")
    await stack.start("webhooks")
    await stack.start("reconciler")
    await stack.start("gateway")

    paid = (await ctl.ok("pay", "--amount", "100.00", "--customer", "c1", "--json")).json()
    payment_id = paid["id"]

    async def payment_status() -> str:
        status: str = (await ctl.ok("payments", "get", payment_id, "--json")).json()["status"]
        return status

    async def refund_status(refund_id: str) -> str:
        status: str = (await ctl.ok("refunds", "get", refund_id, "--json")).json()["status"]
        return status

    await eventually(lambda: _is(payment_status(), "completed"), within=20, interval=0.2)

    first = (
        await ctl.ok(
            *("refund", payment_id, "--amount", "25.00", "--reason", "paid twice"),
            *("--idempotency-key", "refund-1", "--json"),
        )
    ).json()
    assert (first["status"], first["amount"]) == ("pending", "25.00")
    again = await ctl.ok(
        "refund",
        payment_id,
        "--amount",
        "25.00",
        "--reason",
        "paid twice",
        "--idempotency-key",
        "refund-1",
    )
    assert "replayed" in again.stdout
    await eventually(lambda: _is(refund_status(first["id"]), "succeeded"), within=20, interval=0.2)
    assert await payment_status() == "partially_refunded"

    rest = (await ctl.ok("refund", payment_id, "--json")).json()
    assert rest["amount"] == "75.00"
    await eventually(lambda: _is(payment_status(), "refunded"), within=20, interval=0.2)

    listed = await ctl.ok("refunds", "list", payment_id)
    assert first["id"] in listed.stdout
    assert rest["id"] in listed.stdout
    stats = (await ctl.ok("stats", "--json")).json()
    assert stats["refunds"]["refunded"] == {"USD": {"count": 2, "amount": "100.00"}}
    assert "refunded:" in (await ctl.ok("stats")).stdout

    refused = await ctl("refund", payment_id, "--amount", "1")
    assert refused.code == 1
    assert "payment_not_refundable" in refused.stderr
    not_cancelable = await ctl("cancel", payment_id)
    assert not_cancelable.code == 1
    assert "payment_not_cancelable" in not_cancelable.stderr


async def _is(read: Awaitable[str], expected: str) -> bool:
    return await read == expected
