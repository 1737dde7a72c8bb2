"""Reconciliation runs against the real database and the simulated provider in-process."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from libs.common.db import Connection, Database
from libs.common.provider_client import Charge, ProviderClient
from libs.common.settings import ProviderSettings
from libs.common.states import PaymentStatus, TransitionSource
from services.provider.app import create_app as create_provider
from services.reconciler.runs import ADVISORY_LOCK_KEY, Reconciler, RunPolicy
from tests.payments_data import create_payment, move_to
from tests.support import eventually, free_port
from tests.tcp_proxy import TcpProxy

POLICY = RunPolicy(min_age_seconds=0, resubmit_max_age_seconds=3600, concurrency=5)

StartProvider = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_provider(database_url: str) -> AsyncIterator[StartProvider]:
    """Starts the simulated provider in-process; it never sends a webhook."""
    servers: list[TestServer] = []

    async def start(*, settle_delay_ms: int = 20) -> str:
        settings = ProviderSettings(
            database_url=database_url,
            provider_webhook_delay_ms=settle_delay_ms,
            provider_decline_rate=0,
            provider_webhook_drop_rate=1,
            provider_webhook_url=f"http://127.0.0.1:{free_port()}/nowhere",
        )
        server = TestServer(create_provider(settings), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def client(http: aiohttp.ClientSession, url: str) -> ProviderClient:
    return ProviderClient(http, url, timeout_seconds=5, attempts=1, backoff_seconds=0.01)


async def add_payment(
    db: Database,
    *,
    age_seconds: float = 600,
    customer_id: str = "c1",
    amount_minor: int = 1500,
) -> uuid.UUID:
    """A pending payment created `age_seconds` ago, with its creation audit row."""
    payment_id = uuid.uuid4()

    async def insert(conn: Connection) -> None:
        await create_payment(
            conn,
            payment_id,
            amount_minor=amount_minor,
            customer_id=customer_id,
            created_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_seconds),
        )

    await db.transaction(insert)
    return payment_id


async def charge(db: Database, provider: ProviderClient, payment_id: uuid.UUID) -> Charge:
    """Charge the payment at the provider and record `processing`, as the payments service does."""
    row = await db.fetchrow(
        "SELECT reference, amount_minor, currency, customer_id FROM payments.payments"
        " WHERE id = $1",
        payment_id,
    )
    assert row is not None
    created = await provider.create_charge(
        payment_id=payment_id,
        reference=row["reference"],
        amount_minor=row["amount_minor"],
        currency=row["currency"],
        customer_id=row["customer_id"],
    )
    if created.status == "processing":
        await db.transaction(
            lambda conn: move_to(
                conn,
                payment_id,
                PaymentStatus.PROCESSING,
                source=TransitionSource.PROVIDER,
                provider="simulated",
                provider_reference=created.id,
            )
        )
    return created


async def wait_settled(db: Database) -> None:
    async def settled() -> bool:
        row = await db.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'processing') AS open, count(*) AS n"
            " FROM provider.charges"
        )
        assert row is not None
        return bool(row["n"]) and row["open"] == 0

    await eventually(settled, within=10)


async def status_of(db: Database, payment_id: uuid.UUID) -> str:
    row = await db.fetchrow("SELECT status FROM payments.payments WHERE id = $1", payment_id)
    assert row is not None
    return str(row["status"])


async def statuses(db: Database) -> dict[uuid.UUID, str]:
    return {
        row["id"]: row["status"]
        for row in await db.fetch("SELECT id, status FROM payments.payments")
    }


async def run_log(db: Database, run_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM reconciler.reconciliation_logs WHERE id = $1", run_id)
    assert row is not None
    return dict(row)


async def items(db: Database, run_id: uuid.UUID) -> dict[uuid.UUID, tuple[str, str, str]]:
    rows = await db.fetch(
        "SELECT payment_id, from_status, to_status, reason FROM reconciler.reconciliation_items"
        " WHERE run_id = $1",
        run_id,
    )
    return {r["payment_id"]: (r["from_status"], r["to_status"], r["reason"]) for r in rows}


async def reconciler_events(db: Database) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT payment_id, from_status, to_status, applied, reason FROM payments.payment_events"
        " WHERE source = 'reconciler' ORDER BY id"
    )
    return [dict(row) for row in rows]


async def charges_for(db: Database, payment_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, status FROM provider.charges WHERE payment_id = $1", payment_id
    )
    return [dict(row) for row in rows]


async def test_settles_processing_payments_as_the_provider_says(
    db: Database, start_provider: StartProvider, http: aiohttp.ClientSession
) -> None:
    provider = client(http, await start_provider())
    succeeded = [await add_payment(db) for _ in range(3)]
    declined = [await add_payment(db, customer_id="decline-card") for _ in range(2)]
    charges = {p: await charge(db, provider, p) for p in succeeded + declined}
    # Declined at once by the provider: still `processing` here, as if its webhook was lost.
    for payment_id in declined:
        await db.transaction(
            lambda conn, payment_id=payment_id: move_to(
                conn, payment_id, PaymentStatus.PROCESSING, source=TransitionSource.PROVIDER
            )
        )
    await wait_settled(db)
    assert set((await statuses(db)).values()) == {"processing"}

    summary = await Reconciler(db, provider, POLICY).run(trigger="manual")

    assert summary.status == "completed"
    assert (summary.checked, summary.updated, summary.unchanged, summary.errors) == (5, 5, 0, 0)
    for payment_id in succeeded:
        assert await status_of(db, payment_id) == "completed"
    for payment_id in declined:
        assert await status_of(db, payment_id) == "failed"
    row = await db.fetchrow(
        "SELECT provider_reference, failure_reason FROM payments.payments WHERE id = $1",
        declined[0],
    )
    assert row is not None
    assert row["provider_reference"] == charges[declined[0]].id
    assert row["failure_reason"] == "card_declined"

    recorded = await items(db, summary.run_id)
    assert set(recorded) == set(succeeded + declined)
    for payment_id in succeeded:
        assert recorded[payment_id] == (
            "processing",
            "completed",
            f"provider charge {charges[payment_id].id} is succeeded",
        )
    for payment_id in declined:
        assert recorded[payment_id] == (
            "processing",
            "failed",
            f"provider charge {charges[payment_id].id} is declined",
        )

    log = await run_log(db, summary.run_id)
    assert log["trigger"] == "manual"
    assert log["status"] == "completed"
    assert (log["checked"], log["updated"], log["unchanged"], log["errors"]) == (5, 5, 0, 0)
    assert log["error_details"] == []
    assert log["finished_at"] is not None
    assert log["finished_at"] >= log["started_at"]
    assert log["duration_ms"] == summary.duration_ms
    assert log["duration_ms"] >= 0

    events = await reconciler_events(db)
    assert len(events) == 5
    assert all(e["applied"] for e in events)
    assert all(str(summary.run_id) in e["reason"] for e in events)

    before = await statuses(db)
    again = await Reconciler(db, provider, POLICY).run(trigger="cron")
    assert again.status == "completed"
    assert (again.checked, again.updated, again.errors) == (0, 0, 0)
    assert await statuses(db) == before
    assert await items(db, again.run_id) == {}
    assert len(await reconciler_events(db)) == 5
    assert (await run_log(db, again.run_id))["trigger"] == "cron"


async def test_a_charge_still_processing_moves_a_pending_payment_to_processing_once(
    db: Database, start_provider: StartProvider, http: aiohttp.ClientSession
) -> None:
    provider = client(http, await start_provider(settle_delay_ms=600_000))
    payment_id = await add_payment(db)
    # The provider took the charge; the payments service never recorded it.
    created = await provider.create_charge(
        payment_id=payment_id,
        reference=f"PAY-{payment_id.hex[:10].upper()}",
        amount_minor=1500,
        currency="USD",
        customer_id="c1",
    )

    first = await Reconciler(db, provider, POLICY).run(trigger="manual")
    second = await Reconciler(db, provider, POLICY).run(trigger="manual")

    assert (first.checked, first.updated) == (1, 1)
    assert (await items(db, first.run_id))[payment_id] == (
        "pending",
        "processing",
        f"provider charge {created.id} is processing",
    )
    assert (second.status, second.checked, second.updated, second.unchanged) == (
        "completed",
        1,
        0,
        1,
    )
    assert await items(db, second.run_id) == {}
    assert await status_of(db, payment_id) == "processing"
    assert len(await charges_for(db, payment_id)) == 1


async def test_young_payments_are_left_for_their_webhook(
    db: Database, start_provider: StartProvider, http: aiohttp.ClientSession
) -> None:
    provider = client(http, await start_provider())
    old = await add_payment(db, age_seconds=600)
    young = await add_payment(db, age_seconds=5)
    for payment_id in (old, young):
        await charge(db, provider, payment_id)
    await wait_settled(db)
    policy = RunPolicy(min_age_seconds=120, resubmit_max_age_seconds=3600)

    summary = await Reconciler(db, provider, policy).run(trigger="manual")

    assert (summary.status, summary.checked, summary.updated) == ("completed", 1, 1)
    assert await status_of(db, old) == "completed"
    assert await status_of(db, young) == "processing"
    assert set(await items(db, summary.run_id)) == {old}


async def test_a_young_payment_the_provider_never_saw_is_submitted_again(
    db: Database, start_provider: StartProvider, http: aiohttp.ClientSession
) -> None:
    provider = client(http, await start_provider(settle_delay_ms=600_000))
    payment_id = await add_payment(db, age_seconds=300)
    assert await charges_for(db, payment_id) == []

    summary = await Reconciler(db, provider, POLICY).run(trigger="manual")

    assert (summary.status, summary.checked, summary.updated) == ("completed", 1, 1)
    charges = await charges_for(db, payment_id)
    assert len(charges) == 1
    assert await status_of(db, payment_id) == "processing"
    row = await db.fetchrow(
        "SELECT provider_reference FROM payments.payments WHERE id = $1", payment_id
    )
    assert row is not None
    assert row["provider_reference"] == charges[0]["id"]
    assert (await items(db, summary.run_id))[payment_id] == (
        "pending",
        "processing",
        f"resubmitted: provider charge {charges[0]['id']} is processing",
    )

    # The next run finds the charge and submits nothing more.
    again = await Reconciler(db, provider, POLICY).run(trigger="manual")
    assert (again.checked, again.updated, again.unchanged) == (1, 0, 1)
    assert len(await charges_for(db, payment_id)) == 1


async def test_an_old_payment_the_provider_never_saw_is_failed_with_the_reason(
    db: Database, start_provider: StartProvider, http: aiohttp.ClientSession
) -> None:
    provider = client(http, await start_provider())
    payment_id = await add_payment(db, age_seconds=7200)

    summary = await Reconciler(db, provider, POLICY).run(trigger="manual")

    assert (summary.status, summary.checked, summary.updated) == ("completed", 1, 1)
    assert await charges_for(db, payment_id) == []
    row = await db.fetchrow(
        "SELECT status, failure_reason FROM payments.payments WHERE id = $1", payment_id
    )
    assert row is not None
    assert row["status"] == "failed"
    assert row["failure_reason"].startswith("provider has no charge after ")
    from_status, to_status, reason = (await items(db, summary.run_id))[payment_id]
    assert (from_status, to_status) == ("pending", "failed")
    assert reason == row["failure_reason"]


async def test_unreachable_provider_makes_a_partial_run_that_changes_nothing(
    db: Database, start_provider: StartProvider, http: aiohttp.ClientSession
) -> None:
    provider = client(http, await start_provider())
    processing = [await add_payment(db) for _ in range(3)]
    for payment_id in processing:
        await charge(db, provider, payment_id)
    pending = await add_payment(db, age_seconds=7200)  # would be failed if the provider answered
    await wait_settled(db)
    before = await statuses(db)
    nowhere = client(http, f"http://127.0.0.1:{free_port()}")

    summary = await Reconciler(db, nowhere, POLICY).run(trigger="manual")

    assert summary.status == "partial"
    assert (summary.checked, summary.updated, summary.errors) == (4, 0, 4)
    assert await statuses(db) == before
    assert await reconciler_events(db) == []
    assert await items(db, summary.run_id) == {}
    log = await run_log(db, summary.run_id)
    assert (log["status"], log["checked"], log["updated"], log["errors"]) == ("partial", 4, 0, 4)
    assert log["finished_at"] is not None
    assert log["duration_ms"] is not None
    assert {d["payment_id"] for d in log["error_details"]} == {
        str(p) for p in [*processing, pending]
    }
    assert all("GET /charges" in d["error"] for d in log["error_details"])

    # Reachable again: the next run settles them.
    after = await Reconciler(db, provider, POLICY).run(trigger="manual")
    assert (after.status, after.checked, after.updated, after.errors) == ("completed", 4, 4, 0)
    assert await status_of(db, pending) == "failed"
    assert {await status_of(db, p) for p in processing} == {"completed"}


@pytest.fixture
async def slow_provider(start_provider: StartProvider) -> AsyncIterator[tuple[str, TcpProxy]]:
    """The provider behind a proxy that delays every answer, so a run takes a while."""
    url = await start_provider()
    host, port = url.removeprefix("http://").split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    try:
        yield url, proxy
    finally:
        await proxy.close()


async def test_two_runs_at_once_one_executes_and_one_is_skipped(
    db: Database,
    slow_provider: tuple[str, TcpProxy],
    http: aiohttp.ClientSession,
) -> None:
    direct_url, proxy = slow_provider
    direct = client(http, direct_url)
    payment_ids = [await add_payment(db) for _ in range(12)]
    for payment_id in payment_ids:
        await charge(db, direct, payment_id)
    await wait_settled(db)
    proxy.response_delay_seconds = 0.05
    slow = client(http, f"http://127.0.0.1:{proxy.port}")
    policy = RunPolicy(min_age_seconds=0, resubmit_max_age_seconds=3600, concurrency=3)

    first, second = await asyncio.gather(
        Reconciler(db, slow, policy).run(trigger="manual"),
        Reconciler(db, slow, policy).run(trigger="cron"),
    )

    ran, skipped = (first, second) if first.status == "completed" else (second, first)
    assert (ran.status, skipped.status) == ("completed", "skipped")
    assert (ran.checked, ran.updated) == (12, 12)
    assert (skipped.checked, skipped.updated) == (0, 0)
    assert ran.duration_ms >= 100  # it really overlapped the other's attempt
    skipped_log = await run_log(db, skipped.run_id)
    assert skipped_log["status"] == "skipped"
    assert skipped_log["finished_at"] is not None
    assert await items(db, skipped.run_id) == {}

    applied = await db.fetch(
        "SELECT payment_id, count(*) AS n FROM payments.payment_events"
        " WHERE source = 'reconciler' AND applied GROUP BY payment_id"
    )
    assert {row["payment_id"]: row["n"] for row in applied} == dict.fromkeys(payment_ids, 1)

    # The lock was released: a later run executes.
    later = await Reconciler(db, slow, policy).run(trigger="manual")
    assert (later.status, later.checked) == ("completed", 0)


class WebhookLandsMeanwhile(ProviderClient):
    """Applies the provider's webhook after the reconciler's lookup and before its write."""

    def __init__(self, db: Database, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.db = db
        self.landed: list[uuid.UUID] = []

    async def find_charges(self, payment_id: uuid.UUID) -> list[Charge]:
        charges = await super().find_charges(payment_id)
        target = (
            PaymentStatus.COMPLETED if charges[0].status == "succeeded" else (PaymentStatus.FAILED)
        )
        transition = await self.db.transaction(
            lambda conn: move_to(
                conn, payment_id, target, source=TransitionSource.WEBHOOK, reason="webhook"
            )
        )
        assert transition.applied
        self.landed.append(payment_id)
        return charges


async def test_a_webhook_landing_during_the_run_wins_and_the_reconciler_is_refused(
    db: Database, start_provider: StartProvider, http: aiohttp.ClientSession
) -> None:
    url = await start_provider()
    payment_id = await add_payment(db)
    await charge(db, client(http, url), payment_id)
    await wait_settled(db)
    provider = WebhookLandsMeanwhile(db, http, url, timeout_seconds=5, attempts=1)

    summary = await Reconciler(db, provider, POLICY).run(trigger="manual")

    assert provider.landed == [payment_id]
    assert summary.status == "completed"
    assert (summary.checked, summary.updated, summary.unchanged) == (1, 0, 1)
    assert await status_of(db, payment_id) == "completed"
    assert await items(db, summary.run_id) == {}
    events = await db.fetch(
        "SELECT from_status, to_status, applied, source, reason FROM payments.payment_events"
        " WHERE payment_id = $1 ORDER BY id",
        payment_id,
    )
    assert [(e["from_status"], e["to_status"], e["applied"], e["source"]) for e in events] == [
        (None, "pending", True, "api"),
        ("pending", "processing", True, "provider"),
        ("processing", "completed", True, "webhook"),
        ("completed", "completed", False, "reconciler"),
    ]
    assert events[-1]["reason"].startswith("refused: not allowed from completed")
    assert str(summary.run_id) in events[-1]["reason"]
    log = await run_log(db, summary.run_id)
    assert (log["updated"], log["unchanged"]) == (0, 1)


class BreaksOnOne(ProviderClient):
    """Answers slowly, except for one payment where it fails in a way nobody expects."""

    def __init__(self, broken: uuid.UUID, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broken = broken
        self.in_flight = 0

    async def find_charges(self, payment_id: uuid.UUID) -> list[Charge]:
        if payment_id == self.broken:
            raise RuntimeError("unexpected")
        self.in_flight += 1
        try:
            await asyncio.sleep(0.3)
            return await super().find_charges(payment_id)
        finally:
            self.in_flight -= 1


async def test_a_failed_run_leaves_no_work_behind_it(
    db: Database, start_provider: StartProvider, http: aiohttp.ClientSession
) -> None:
    url = await start_provider()
    direct = client(http, url)
    broken = await add_payment(db, age_seconds=900)  # oldest: looked up first
    others = [await add_payment(db) for _ in range(3)]
    for payment_id in [broken, *others]:
        await charge(db, direct, payment_id)
    await wait_settled(db)
    provider = BreaksOnOne(broken, http, url, timeout_seconds=5, attempts=1)

    summary = await Reconciler(db, provider, POLICY).run(trigger="manual")

    assert summary.status == "failed"
    assert summary.errors == 1
    assert "unexpected" in summary.error_details[0]["error"]
    # Drained: the lookups still in flight when the run failed have ended.
    await eventually(lambda: provider.in_flight == 0)
    log = await run_log(db, summary.run_id)
    assert (log["status"], log["updated"]) == ("failed", 0)
    # Nothing was settled once the run had been recorded as over and its lock released.
    assert await items(db, summary.run_id) == {}
    assert await reconciler_events(db) == []


async def test_a_redelivered_request_closes_the_attempt_that_died(
    db: Database, database_url: str, http: aiohttp.ClientSession
) -> None:
    """The process running a run died; its request comes back while another run holds
    the lock: the dead attempt's row must not stay `running` forever."""
    run_id = uuid.uuid4()
    await db.transaction(
        lambda conn: conn.execute(
            "INSERT INTO reconciler.reconciliation_logs (id, trigger, status)"
            " VALUES ($1, 'manual', 'running')",
            run_id,
        )
    )
    holder = await asyncpg.connect(database_url)
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY)
        nowhere = client(http, f"http://127.0.0.1:{free_port()}")
        reconciler = Reconciler(
            db, nowhere, RunPolicy(min_age_seconds=0, resubmit_max_age_seconds=60)
        )
        summary = await reconciler.run(trigger="manual", run_id=run_id)
    finally:
        await holder.close()

    assert summary.status == "skipped"
    log = await run_log(db, run_id)
    assert log["status"] == "failed"
    assert log["finished_at"] is not None
    assert "interrupted" in log["error_details"][-1]["error"]
