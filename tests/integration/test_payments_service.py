"""The payments service's handling of payment.requested, with the real provider in-process."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from libs.common.db import Database
from libs.common.messages import Envelope, PaymentRequested, wrap
from libs.common.provider_client import ProviderClient
from libs.common.settings import ProviderSettings
from services.payments.charging import PaymentIntake
from services.provider.app import create_app as create_provider
from tests.support import free_port


def requested(customer_id: str = "c1", amount_minor: int = 5000) -> Envelope[PaymentRequested]:
    payment_id = uuid.uuid4()
    return wrap(
        PaymentRequested(
            payment_id=payment_id,
            reference=f"PAY-{payment_id.hex[:10].upper()}",
            amount_minor=amount_minor,
            currency="USD",
            customer_id=customer_id,
            description="gas bill",
            metadata={"invoice": "INV-1"},
            requested_at=dt.datetime.now(dt.UTC),
        )
    )


@pytest.fixture
async def provider_url(database_url: str) -> AsyncIterator[str]:
    settings = ProviderSettings(
        database_url=database_url,
        provider_webhook_delay_ms=600_000,  # stays processing; no webhook during the test
        provider_webhook_url=f"http://127.0.0.1:{free_port()}/nowhere",
    )
    server = TestServer(create_provider(settings), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def payment_row(db: Database, payment_id: uuid.UUID) -> dict[str, object]:
    row = await db.fetchrow(
        "SELECT status, amount_minor, description, metadata, provider, provider_reference,"
        " failure_reason FROM payments.payments WHERE id = $1",
        payment_id,
    )
    assert row is not None
    return dict(row)


async def charges(db: Database, payment_id: uuid.UUID) -> int:
    row = await db.fetchrow(
        "SELECT count(*) AS n FROM provider.charges WHERE payment_id = $1", payment_id
    )
    assert row is not None
    return int(row["n"])


async def test_payment_is_stored_then_charged(
    db: Database, provider_url: str, http: aiohttp.ClientSession
) -> None:
    intake = PaymentIntake(db, ProviderClient(http, provider_url, timeout_seconds=5))
    envelope = requested()

    await intake.handle(envelope)

    payment = await payment_row(db, envelope.payload.payment_id)
    assert payment["status"] == "processing"
    assert payment["amount_minor"] == 5000
    assert payment["metadata"] == {"invoice": "INV-1"}
    assert payment["provider"] == "simulated"
    assert str(payment["provider_reference"]).startswith("ch_")
    events = await db.fetch(
        "SELECT from_status, to_status, source FROM payments.payment_events"
        " WHERE payment_id = $1 ORDER BY id",
        envelope.payload.payment_id,
    )
    assert [tuple(e) for e in events] == [
        (None, "pending", "api"),
        ("pending", "processing", "provider"),
    ]
    inbox = await db.fetchrow(
        "SELECT message_type FROM payments.inbox WHERE message_id = $1", envelope.message_id
    )
    assert inbox is not None


async def test_redelivery_neither_charges_nor_records_twice(
    db: Database, provider_url: str, http: aiohttp.ClientSession
) -> None:
    intake = PaymentIntake(db, ProviderClient(http, provider_url, timeout_seconds=5))
    envelope = requested()
    await intake.handle(envelope)
    await intake.handle(envelope)
    assert await charges(db, envelope.payload.payment_id) == 1
    events = await db.fetch(
        "SELECT 1 FROM payments.payment_events WHERE payment_id = $1",
        envelope.payload.payment_id,
    )
    assert len(events) == 2


async def test_declined_charge_fails_the_payment_with_the_reason(
    db: Database, provider_url: str, http: aiohttp.ClientSession
) -> None:
    intake = PaymentIntake(db, ProviderClient(http, provider_url, timeout_seconds=5))
    envelope = requested(customer_id="decline-me")
    await intake.handle(envelope)
    payment = await payment_row(db, envelope.payload.payment_id)
    assert payment["status"] == "failed"
    assert payment["failure_reason"] == "card_declined"


async def test_unreachable_provider_leaves_the_payment_pending(
    db: Database, http: aiohttp.ClientSession
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    client = ProviderClient(http, nowhere, timeout_seconds=1, attempts=3, backoff_seconds=0.01)
    envelope = requested()

    await PaymentIntake(db, client).handle(envelope)  # returns: the message is done with

    payment = await payment_row(db, envelope.payload.payment_id)
    assert payment["status"] == "pending"
    assert payment["provider_reference"] is None


async def test_a_batch_stores_and_charges_each_payment_once_under_its_own_correlation_id(
    db: Database, provider_url: str, http: aiohttp.ClientSession
) -> None:
    intake = PaymentIntake(db, ProviderClient(http, provider_url, timeout_seconds=5))
    fresh = [requested() for _ in range(5)]
    declined = requested(customer_id="decline-me")
    already = requested()
    await intake.handle(already)

    # A redelivered message, a message twice in one batch, a decline, new payments.
    await intake.handle_batch([*fresh, fresh[0], declined, already])

    for envelope in [*fresh, already]:
        assert (await payment_row(db, envelope.payload.payment_id))["status"] == "processing"
        assert await charges(db, envelope.payload.payment_id) == 1
    assert (await payment_row(db, declined.payload.payment_id))["status"] == "failed"
    for envelope in [*fresh, declined]:
        trail = await db.fetch(
            "SELECT from_status, to_status, correlation_id FROM payments.payment_events"
            " WHERE payment_id = $1 ORDER BY id",
            envelope.payload.payment_id,
        )
        assert [(r["from_status"], r["to_status"]) for r in trail] == [
            (None, "pending"),
            ("pending", "processing" if envelope is not declined else "failed"),
        ]
        assert {r["correlation_id"] for r in trail} == {envelope.correlation_id}
