"""A refund from the payments service to the provider and back (webhook or reconciler),
and the charge claim that a cancel respects, with the real provider in-process."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from libs.common.cancellation import cancel_payment
from libs.common.db import Database
from libs.common.errors import ApiError
from libs.common.messages import Envelope, PaymentRequested, RefundRequested, wrap
from libs.common.provider_client import ProviderClient
from libs.common.refunds import NewRefund, create_refund
from libs.common.settings import ProviderSettings
from libs.common.states import PaymentStatus, TransitionSource
from services.payments.charging import PaymentIntake, store_payments
from services.payments.refunding import RefundSubmission
from services.provider.app import create_app as create_provider
from services.reconciler.runs import Reconciler, RunPolicy
from services.reconciler.schedule import measure_backlog
from tests.integration.test_webhooks_service import handle, received
from tests.payments_data import move_to
from tests.support import eventually, free_port

OWNER = "key:test"
POLICY = RunPolicy(min_age_seconds=0, resubmit_max_age_seconds=3600, concurrency=5)


@pytest.fixture
async def provider(database_url: str) -> AsyncIterator[ProviderClient]:
    settings = ProviderSettings(
        database_url=database_url,
        provider_webhook_delay_ms=20,
        provider_decline_rate=0.0,
        # Nobody listens: the webhooks are read from the provider's table instead.
        provider_webhook_url=f"http://127.0.0.1:{free_port()}/nowhere",
    )
    server = TestServer(create_provider(settings), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = str(server.make_url("")).rstrip("/")
            yield ProviderClient(http, url, timeout_seconds=5, attempts=2, backoff_seconds=0.01)
    finally:
        await server.close()


def requested(amount_minor: int = 10000) -> Envelope[PaymentRequested]:
    payment_id = uuid.uuid4()
    return wrap(
        PaymentRequested(
            payment_id=payment_id,
            reference=f"PAY-{payment_id.hex[:10].upper()}",
            amount_minor=amount_minor,
            currency="USD",
            customer_id="c1",
            requested_at=dt.datetime.now(dt.UTC),
            owner=OWNER,
        )
    )


async def one(db: Database, sql: str, *args: Any) -> Any:
    row = await db.fetchrow(sql, *args)
    assert row is not None
    return row[0]


async def completed_payment(db: Database, provider: ProviderClient, amount_minor: int) -> uuid.UUID:
    """A payment charged at the provider and completed (as its webhook would)."""
    envelope = requested(amount_minor)
    await PaymentIntake(db, provider).handle(envelope)
    payment_id = envelope.payload.payment_id

    async def charge_succeeded() -> bool:
        charges = await provider.find_charges(payment_id)
        return bool(charges) and charges[0].status == "succeeded"

    await eventually(charge_succeeded)
    await db.transaction(
        lambda conn: move_to(
            conn, payment_id, PaymentStatus.COMPLETED, source=TransitionSource.WEBHOOK
        )
    )
    return payment_id


async def new_refund(db: Database, payment_id: uuid.UUID, amount: str | None) -> uuid.UUID:
    refund_id = uuid.uuid4()
    await create_refund(
        db,
        NewRefund(
            refund_id, payment_id, OWNER, None if amount is None else Decimal(amount), "test"
        ),
    )
    return refund_id


def refund_requested(refund_id: uuid.UUID, payment_id: uuid.UUID) -> Envelope[RefundRequested]:
    return wrap(
        RefundRequested(
            refund_id=refund_id, payment_id=payment_id, requested_at=dt.datetime.now(dt.UTC)
        )
    )


async def refund_row(db: Database, refund_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM payments.refunds WHERE id = $1", refund_id)
    assert row is not None
    return dict(row)


async def provider_refunds(db: Database, refund_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT * FROM provider.refunds WHERE reference = $1", str(refund_id))
    return [dict(r) for r in rows]


async def settled_at_provider(db: Database, refund_id: uuid.UUID) -> bool:
    rows = await provider_refunds(db, refund_id)
    return bool(rows) and rows[0]["status"] != "processing"


async def status_of(db: Database, payment_id: uuid.UUID) -> str:
    status: str = await one(db, "SELECT status FROM payments.payments WHERE id = $1", payment_id)
    return status


async def test_a_refund_is_submitted_once_and_settled_by_its_webhook(
    db: Database, provider: ProviderClient
) -> None:
    payment_id = await completed_payment(db, provider, 10000)
    refund_id = await new_refund(db, payment_id, "40.00")
    submission = RefundSubmission(db, provider)
    message = refund_requested(refund_id, payment_id)

    await submission.handle(message)
    await submission.handle(message)  # a redelivery

    [at_provider] = await provider_refunds(db, refund_id)
    assert at_provider["amount_minor"] == 4000
    row = await refund_row(db, refund_id)
    assert (row["status"], row["provider_refund_id"]) == ("pending", at_provider["id"])
    assert row["submitted_at"] is not None

    await eventually(lambda: settled_at_provider(db, refund_id))
    body = await one(
        db,
        "SELECT body FROM provider.webhook_deliveries WHERE refund_id = $1",
        at_provider["id"],
    )
    assert await handle(db, received(body)) == "applied"
    assert await handle(db, received(body)) == "duplicate"
    row = await refund_row(db, refund_id)
    assert row["status"] == "succeeded"
    assert await status_of(db, payment_id) == "partially_refunded"
    # The reconciler, later, finds nothing to do.
    summary = await Reconciler(db, provider, POLICY).run(trigger="manual")
    assert summary.updated == 0


async def test_the_reconciler_settles_a_refund_whose_webhook_never_came(
    db: Database, provider: ProviderClient
) -> None:
    payment_id = await completed_payment(db, provider, 10000)
    refund_id = await new_refund(db, payment_id, None)
    await RefundSubmission(db, provider).handle(refund_requested(refund_id, payment_id))
    await eventually(lambda: settled_at_provider(db, refund_id))

    summary = await Reconciler(db, provider, POLICY).run(trigger="manual")

    assert summary.updated == 1
    assert (await refund_row(db, refund_id))["status"] == "succeeded"
    assert await status_of(db, payment_id) == "refunded"
    item = await db.fetchrow(
        "SELECT from_status, to_status FROM reconciler.reconciliation_items WHERE payment_id = $1",
        payment_id,
    )
    assert item is not None
    assert tuple(item) == ("completed", "refunded")
    # Its webhook, arriving after all, changes nothing.
    [at_provider] = await provider_refunds(db, refund_id)
    body = await one(
        db, "SELECT body FROM provider.webhook_deliveries WHERE refund_id = $1", at_provider["id"]
    )
    assert await handle(db, received(body)) == "refused"


async def test_the_reconciler_submits_a_refund_that_was_never_published(
    db: Database, provider: ProviderClient
) -> None:
    payment_id = await completed_payment(db, provider, 10000)
    refund_id = await new_refund(db, payment_id, "10")  # stored; the gateway "died" here
    await measure_backlog(db)
    assert (REGISTRY.get_sample_value("refunds_oldest_pending_age_seconds") or 0) > 0

    await Reconciler(db, provider, POLICY).run(trigger="manual")

    [at_provider] = await provider_refunds(db, refund_id)
    assert at_provider["amount_minor"] == 1000
    await eventually(lambda: settled_at_provider(db, refund_id))
    await Reconciler(db, provider, POLICY).run(trigger="manual")
    assert (await refund_row(db, refund_id))["status"] == "succeeded"
    assert len(await provider_refunds(db, refund_id)) == 1
    await measure_backlog(db)
    assert REGISTRY.get_sample_value("refunds_oldest_pending_age_seconds") == 0


async def test_a_refund_the_provider_refuses_fails_with_its_reason(
    db: Database, provider: ProviderClient
) -> None:
    payment_id = await completed_payment(db, provider, 10000)
    refund_id = await new_refund(db, payment_id, "10")
    # The provider's own records say the charge was refunded in full elsewhere.
    charge_id = await one(
        db, "SELECT provider_reference FROM payments.payments WHERE id = $1", payment_id
    )
    await provider.create_refund(
        refund_id=uuid.uuid4(), charge_id=charge_id, amount_minor=10000, currency="USD"
    )

    await RefundSubmission(db, provider).handle(refund_requested(refund_id, payment_id))

    row = await refund_row(db, refund_id)
    assert row["status"] == "failed"
    assert "amount_exceeds_refundable" in row["failure_reason"]
    assert await status_of(db, payment_id) == "completed"


# --- cancel against charge -----------------------------------------------------------------------


async def test_a_payment_canceled_before_its_charge_is_never_charged(
    db: Database, provider: ProviderClient
) -> None:
    envelope = requested()
    payment_id = envelope.payload.payment_id
    # Stored, then the consumer died before claiming it: the message comes back later.
    await db.statement(lambda conn: store_payments(conn, [envelope]))

    assert await cancel_payment(db, payment_id, OWNER) is PaymentStatus.CANCELED
    await PaymentIntake(db, provider).handle(envelope)
    await Reconciler(db, provider, POLICY).run(trigger="manual")

    assert await status_of(db, payment_id) == "canceled"
    assert await provider.find_charges(payment_id) == []


async def test_a_cancel_after_the_claim_is_refused(db: Database, provider: ProviderClient) -> None:
    envelope = requested()
    await PaymentIntake(db, provider).handle(envelope)
    with pytest.raises(ApiError) as refused:
        await cancel_payment(db, envelope.payload.payment_id, OWNER)
    assert (refused.value.status, refused.value.code) == (409, "payment_not_cancelable")
    assert await status_of(db, envelope.payload.payment_id) == "processing"


async def test_cancels_racing_charges_end_one_way_or_the_other(
    db: Database, provider: ProviderClient
) -> None:
    envelopes = [requested() for _ in range(20)]
    await db.statement(lambda conn: store_payments(conn, envelopes))
    intake = PaymentIntake(db, provider)

    async def cancel(payment_id: uuid.UUID) -> bool | str:
        try:
            await cancel_payment(db, payment_id, OWNER)
        except ApiError as exc:
            return exc.code
        return True

    outcomes = await asyncio.gather(
        intake.handle_batch(envelopes[::2]),
        *(cancel(e.payload.payment_id) for e in envelopes),
        intake.handle_batch(envelopes[1::2]),
    )
    assert {o for o in outcomes[1:-1] if o is not True} <= {"payment_not_cancelable"}
    for envelope, answer in zip(envelopes, outcomes[1:-1], strict=True):
        canceled = answer is True
        payment_id = envelope.payload.payment_id
        charges = await provider.find_charges(payment_id)
        status = await status_of(db, payment_id)
        if canceled:
            assert (status, charges) == ("canceled", [])
        else:
            assert status == "processing"
            assert len(charges) == 1


async def test_a_refund_event_that_names_another_payments_refund_is_rejected(
    db: Database, provider: ProviderClient
) -> None:
    payment_id = await completed_payment(db, provider, 10000)
    other_id = await completed_payment(db, provider, 10000)
    refund_id = await new_refund(db, payment_id, "10")
    reference = await one(db, "SELECT reference FROM payments.payments WHERE id = $1", other_id)
    charge = await one(
        db, "SELECT provider_reference FROM payments.payments WHERE id = $1", other_id
    )

    def event(**data: Any) -> bytes:
        body = {
            "event_id": f"evt_{uuid.uuid4().hex}",
            "event_type": "refund.succeeded",
            "payment_id": str(other_id),
            "provider": "simulated",
            "data": {"reference": reference, "provider_reference": charge, **data},
        }
        return json.dumps(body).encode()

    assert await handle(db, received(event(refund_id=str(refund_id)))) == "rejected"
    assert await handle(db, received(event(refund_id="not-a-uuid"))) == "rejected"
    assert (await refund_row(db, refund_id))["status"] == "pending"
    assert await status_of(db, other_id) == "completed"
