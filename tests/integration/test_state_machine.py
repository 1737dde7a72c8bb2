"""Every allowed and every refused payment transition, against the real schema."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import pytest

from libs.common.db import Connection, Database
from libs.common.logs import correlation_scope
from libs.common.state_machine import TransitionRequest, apply_transitions
from libs.common.states import PaymentStatus, TransitionSource
from tests.payments_data import create_payment, move_to

P = PaymentStatus

# Written out by hand rather than derived from libs.common.states, so a change to the
# rules has to change this table too.
ALLOWED = {
    (P.PENDING, P.PROCESSING),
    (P.PENDING, P.COMPLETED),
    (P.PENDING, P.FAILED),
    (P.PENDING, P.REFUNDED),
    (P.PROCESSING, P.COMPLETED),
    (P.PROCESSING, P.FAILED),
    (P.PROCESSING, P.REFUNDED),
    (P.COMPLETED, P.REFUNDED),
    (P.COMPLETED, P.PARTIALLY_REFUNDED),
    (P.PARTIALLY_REFUNDED, P.PARTIALLY_REFUNDED),
    (P.PARTIALLY_REFUNDED, P.REFUNDED),
    (P.PENDING, P.CANCELED),
}
ALL_PAIRS = list(itertools.product(PaymentStatus, PaymentStatus))


async def insert_payment(db: Database, status: PaymentStatus = P.PENDING) -> uuid.UUID:
    payment_id = uuid.uuid4()

    async def insert(conn: Connection) -> None:
        await conn.execute(
            "INSERT INTO payments.payments (id, reference, amount_minor, currency, customer_id,"
            " status) VALUES ($1, $2, 10000, 'USD', 'test_customer', $3)",
            payment_id,
            f"PAY-{payment_id.hex[:10]}",
            status.value,
        )

    await db.transaction(insert)
    return payment_id


async def status_of(db: Database, payment_id: uuid.UUID) -> PaymentStatus:
    row = await db.fetchrow("SELECT status FROM payments.payments WHERE id = $1", payment_id)
    assert row is not None
    return PaymentStatus(row["status"])


async def audit_of(db: Database, payment_id: uuid.UUID) -> list[dict[str, object]]:
    rows = await db.fetch(
        "SELECT from_status, to_status, applied, source, reason, correlation_id"
        " FROM payments.payment_events WHERE payment_id = $1 ORDER BY id",
        payment_id,
    )
    return [dict(row) for row in rows]


@pytest.mark.parametrize(("from_status", "to_status"), ALL_PAIRS, ids=lambda s: str(s))
async def test_transition(db: Database, from_status: P, to_status: P) -> None:
    payment_id = await insert_payment(db, from_status)
    allowed = (from_status, to_status) in ALLOWED

    with correlation_scope("corr-123"):
        result = await db.transaction(
            lambda conn: move_to(
                conn, payment_id, to_status, source=TransitionSource.WEBHOOK, reason="event e1"
            )
        )

    assert result.applied is allowed
    assert result.from_status is from_status
    assert await status_of(db, payment_id) is (to_status if allowed else from_status)
    [audit] = await audit_of(db, payment_id)
    assert audit["from_status"] == from_status.value
    assert audit["to_status"] == to_status.value
    assert audit["applied"] is allowed
    assert audit["source"] == "webhook"
    assert audit["correlation_id"] == "corr-123"
    if allowed:
        assert audit["reason"] == "event e1"
    else:
        assert audit["reason"] == f"refused: not allowed from {from_status}; event e1"


async def test_all_pairs_in_one_batch_follow_the_same_rules(db: Database) -> None:
    """apply_transitions with many payments: the same outcome, status and audit row as
    one at a time, for all 25 pairs at once."""
    payments = {pair: await insert_payment(db, pair[0]) for pair in ALL_PAIRS}
    requests = [
        TransitionRequest(
            payment_id,
            to_status,
            TransitionSource.WEBHOOK,
            reason="event e1",
            correlation_id=f"corr-{from_status}-{to_status}",
        )
        for (from_status, to_status), payment_id in payments.items()
    ]

    results = await db.transaction(lambda conn: apply_transitions(conn, requests))

    assert [r.payment_id for r in results] == list(payments.values())
    for ((from_status, to_status), payment_id), result in zip(
        payments.items(), results, strict=True
    ):
        allowed = (from_status, to_status) in ALLOWED
        assert result.applied is allowed
        assert result.from_status is from_status
        assert await status_of(db, payment_id) is (to_status if allowed else from_status)
        [audit] = await audit_of(db, payment_id)
        assert (audit["from_status"], audit["to_status"]) == (from_status, to_status)
        assert audit["applied"] is allowed
        assert audit["correlation_id"] == f"corr-{from_status}-{to_status}"
        assert audit["reason"] == (
            "event e1" if allowed else f"refused: not allowed from {from_status}; event e1"
        )


async def test_a_batch_refuses_two_moves_of_one_payment(db: Database) -> None:
    payment_id = await insert_payment(db)
    twice = [TransitionRequest(payment_id, P.COMPLETED, TransitionSource.WEBHOOK)] * 2
    with pytest.raises(ValueError, match="at most one transition per payment"):
        await db.transaction(lambda conn: apply_transitions(conn, twice))


async def test_transition_sets_provider_fields_only_when_applied(db: Database) -> None:
    payment_id = await insert_payment(db, P.PENDING)
    await db.transaction(
        lambda conn: move_to(
            conn,
            payment_id,
            P.PROCESSING,
            source=TransitionSource.PROVIDER,
            provider="simulated",
            provider_reference="ch_1",
        )
    )
    await db.transaction(
        lambda conn: move_to(
            conn, payment_id, P.PENDING, source=TransitionSource.API, failure_reason="nope"
        )
    )
    row = await db.fetchrow(
        "SELECT status, provider, provider_reference, failure_reason FROM payments.payments"
        " WHERE id = $1",
        payment_id,
    )
    assert row is not None
    assert dict(row) == {
        "status": "processing",
        "provider": "simulated",
        "provider_reference": "ch_1",
        "failure_reason": None,
    }


async def test_unknown_payment_is_reported_and_nothing_is_written(db: Database) -> None:
    missing = uuid.uuid4()
    result = await db.transaction(
        lambda conn: move_to(conn, missing, P.COMPLETED, source=TransitionSource.WEBHOOK)
    )
    assert not result.found
    assert not result.applied
    assert await audit_of(db, missing) == []


async def test_audit_rolls_back_with_the_callers_transaction(db: Database) -> None:
    payment_id = await insert_payment(db, P.PROCESSING)

    async def transition_then_fail(conn: Connection) -> None:
        await move_to(conn, payment_id, P.COMPLETED, source=TransitionSource.WEBHOOK)
        raise RuntimeError("the caller's next write failed")

    with pytest.raises(RuntimeError):
        await db.transaction(transition_then_fail)
    assert await status_of(db, payment_id) is P.PROCESSING
    assert await audit_of(db, payment_id) == []


async def test_concurrent_conflicting_transitions_apply_exactly_one(db: Database) -> None:
    """A 'completed' webhook and a 'failed' reconciler verdict racing: one wins, once."""
    payment_id = await insert_payment(db, P.PROCESSING)
    results = await asyncio.gather(
        *(
            db.transaction(
                lambda conn, target=target: move_to(
                    conn, payment_id, target, source=TransitionSource.RECONCILER
                )
            )
            for target in [P.COMPLETED, P.FAILED] * 5
        )
    )
    applied = [r for r in results if r.applied]
    assert len(applied) == 1
    assert await status_of(db, payment_id) is applied[0].to_status
    audit = await audit_of(db, payment_id)
    assert len(audit) == 10
    assert sum(1 for a in audit if a["applied"]) == 1
    # Every refusal saw the winner's status, not the stale one.
    assert {a["from_status"] for a in audit if not a["applied"]} == {applied[0].to_status.value}


async def test_creation_writes_the_first_audit_row(db: Database) -> None:
    payment_id = uuid.uuid4()
    await db.transaction(lambda conn: create_payment(conn, payment_id))
    [audit] = await audit_of(db, payment_id)
    assert audit["from_status"] is None
    assert audit["to_status"] == "pending"
    assert audit["applied"] is True
