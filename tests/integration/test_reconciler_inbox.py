"""The reconciler's consumer of `reconciliation.requested` is idempotent through its inbox.

A run claims its request in `reconciler.inbox` in the transaction that records the run
as over, so a redelivered request (its ack lost) does not start a second run, while a
request whose run died before the end runs again.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from libs.common.db import Database
from libs.common.messages import Envelope, ReconciliationRequested, wrap
from libs.common.provider_client import ProviderClient
from libs.common.web import DATABASE
from services.reconciler.app import RECONCILER, _on_request
from services.reconciler.runs import Reconciler, RunPolicy
from tests.payments_data import create_payment
from tests.support import free_port

POLICY = RunPolicy(min_age_seconds=0, resubmit_max_age_seconds=3600)


@pytest.fixture
async def handle(db: Database) -> AsyncIterator[Any]:
    """The consumer's handler, with a provider that cannot be reached (each payment a run
    checks is then one error in its log, which is how these tests count what a run did)."""
    async with aiohttp.ClientSession() as http:
        nowhere = ProviderClient(
            http, f"http://127.0.0.1:{free_port()}", timeout_seconds=5, attempts=1
        )
        app = web.Application()
        app[DATABASE] = db
        app[RECONCILER] = Reconciler(db, nowhere, POLICY)
        yield _on_request(app)


async def add_old_payment(db: Database) -> uuid.UUID:
    payment_id = uuid.uuid4()
    created_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    await db.transaction(lambda conn: create_payment(conn, payment_id, created_at=created_at))
    return payment_id


def request() -> Envelope[ReconciliationRequested]:
    run_id = uuid.uuid4()
    return wrap(ReconciliationRequested(run_id=run_id, trigger="manual"), message_id=run_id)


async def run_row(db: Database, run_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchrow(
        "SELECT status, checked, errors, finished_at FROM reconciler.reconciliation_logs"
        " WHERE id = $1",
        run_id,
    )
    assert row is not None
    return dict(row)


async def inbox_rows(db: Database) -> list[tuple[uuid.UUID, str]]:
    rows = await db.fetch("SELECT message_id, message_type FROM reconciler.inbox")
    return [(row["message_id"], row["message_type"]) for row in rows]


async def test_a_redelivered_request_does_not_start_a_second_run(db: Database, handle: Any) -> None:
    await add_old_payment(db)
    envelope = request()

    await handle(envelope)
    first = await run_row(db, envelope.payload.run_id)
    assert (first["status"], first["checked"], first["errors"]) == ("partial", 1, 1)
    assert await inbox_rows(db) == [(envelope.message_id, ReconciliationRequested.TYPE)]

    # Another payment to check: a second run would check two and rewrite the run's row.
    await add_old_payment(db)
    await handle(envelope)

    assert await run_row(db, envelope.payload.run_id) == first
    assert await inbox_rows(db) == [(envelope.message_id, ReconciliationRequested.TYPE)]


async def test_a_request_whose_run_died_runs_again_when_redelivered(
    db: Database, handle: Any
) -> None:
    await add_old_payment(db)
    envelope = request()
    # What a process that died in the middle of the run leaves: the run `running`, the
    # request not claimed.
    await db.transaction(
        lambda conn: conn.execute(
            "INSERT INTO reconciler.reconciliation_logs (id, trigger, status)"
            " VALUES ($1, 'manual', 'running')",
            envelope.payload.run_id,
        )
    )
    assert await inbox_rows(db) == []

    await handle(envelope)

    row = await run_row(db, envelope.payload.run_id)
    assert (row["status"], row["checked"], row["errors"]) == ("partial", 1, 1)
    assert row["finished_at"] is not None
    assert await inbox_rows(db) == [(envelope.message_id, ReconciliationRequested.TYPE)]
