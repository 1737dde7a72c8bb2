"""The webhooks service's handling of webhook.received, straight against a real database.

`WebhookIntake.handle` and `retry_orphans` are called directly (no broker): what they
store in webhooks.webhook_events, what they do to payments.payments, and the audit rows
they leave in payments.payment_events. The last test delivers a payment's events in
every order hypothesis can think of, with duplicates, one by one or in batches of any
size, and checks that the payment ends where in-order delivery leaves it: the state
machine never goes backwards.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from libs.common.broker.consumer import PoisonMessage
from libs.common.db import Connection, Database
from libs.common.messages import Envelope, WebhookReceived, wrap
from libs.common.signing import seed_signature
from libs.common.states import PaymentStatus
from libs.common.webhooks_store import ORPHAN_ATTEMPTS
from services.webhooks.handling import WebhookIntake, retry_orphans
from tests.payments_data import create_payment

P = PaymentStatus
SECRET = "webhook-secret-key"
PROVIDER = "test_provider"
OUTCOMES = ("applied", "refused", "rejected", "ignored", "orphaned", "duplicate", "redelivered")


@dataclasses.dataclass(frozen=True)
class Payment:
    id: uuid.UUID
    reference: str


async def add_payment(db: Database, payment_id: uuid.UUID | None = None) -> Payment:
    """A pending payment with its creation audit row, as the payments service stores it."""
    payment_id = payment_id or uuid.uuid4()
    payment = Payment(payment_id, f"PAY-{payment_id.hex[:10].upper()}")

    async def insert(conn: Connection) -> None:
        await create_payment(conn, payment.id, reference=payment.reference)

    await db.transaction(insert)
    return payment


def webhook_body(
    payment_id: str,
    reference: str | None,
    event_type: str = "payment.completed",
    *,
    event_id: str | None = None,
    provider: str = PROVIDER,
    trailing: str = "1\n",
    **data: str,
) -> bytes:
    """The seed's payload shape (compact JSON, stray `1` and newline after it by default)."""
    payload: dict[str, Any] = {}
    if event_id is not None:
        payload["event_id"] = event_id
    payload |= {"event_type": event_type, "payment_id": payment_id, "provider": provider}
    payload["data"] = ({"reference": reference} if reference is not None else {}) | data
    return (json.dumps(payload, separators=(",", ":")) + trailing).encode()


def received(raw: bytes) -> Envelope[WebhookReceived]:
    """A fresh message (new message id) carrying `raw` as the gateway verified it."""
    now = dt.datetime.now(dt.UTC)
    return wrap(
        WebhookReceived(
            raw_body=base64.b64encode(raw),
            headers={
                "Content-Type": "application/json",
                "X-Webhook-Signature": seed_signature(raw, SECRET),
            },
            signature_scheme="seed",
            received_at=now - dt.timedelta(milliseconds=5),
            verified_at=now,
        )
    )


def _outcome_counts() -> dict[str, float]:
    outcomes = [*OUTCOMES, *(f"{o}_on_retry" for o in OUTCOMES)]
    return {
        o: REGISTRY.get_sample_value("webhook_events_total", {"outcome": o}) or 0.0
        for o in outcomes
    }


def _counted_since(before: dict[str, float]) -> dict[str, float]:
    after = _outcome_counts()
    return {o: after[o] - before[o] for o in after if after[o] != before[o]}


async def handle(db: Database, envelope: Envelope[WebhookReceived]) -> str:
    """Handle one message; return the outcome the service counted for it."""
    before = _outcome_counts()
    await WebhookIntake(db).handle(envelope)
    [(outcome, count)] = _counted_since(before).items()
    assert count == 1
    return outcome


async def events(db: Database) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, provider, provider_event_id, event_type, claimed_payment_id, payment_id,"
        " raw_body, headers, signature_scheme, status, error, attempts, processed_at,"
        " next_attempt_at, duplicates, last_duplicate_at"
        " FROM webhooks.webhook_events ORDER BY created_at, id"
    )
    return [dict(row) for row in rows]


async def payment_row(db: Database, payment_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchrow(
        "SELECT status, provider_reference, failure_reason FROM payments.payments WHERE id = $1",
        payment_id,
    )
    assert row is not None
    return dict(row)


async def audit(db: Database, payment_id: uuid.UUID) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT from_status, to_status, applied, source FROM payments.payment_events"
        " WHERE payment_id = $1 ORDER BY id",
        payment_id,
    )
    return [tuple(row) for row in rows]


async def snapshot(db: Database) -> tuple[Any, ...]:
    """Everything the service writes, to prove a call changed nothing."""
    return (
        await events(db),
        [dict(r) for r in await db.fetch("SELECT * FROM payments.payments ORDER BY id")],
        [dict(r) for r in await db.fetch("SELECT * FROM payments.payment_events ORDER BY id")],
        [dict(r) for r in await db.fetch("SELECT * FROM webhooks.inbox ORDER BY message_id")],
    )


CREATED = (None, "pending", True, "api")


async def test_seed_event_completes_the_payment(db: Database) -> None:
    payment = await add_payment(db)
    raw = webhook_body(str(payment.id), payment.reference)
    assert raw.endswith(b"}}1\n")
    envelope = received(raw)

    assert await handle(db, envelope) == "applied"

    [event] = await events(db)
    assert event["status"] == "applied"
    assert event["error"] is None
    assert event["attempts"] == 1
    assert event["duplicates"] == 0
    assert event["payment_id"] == payment.id
    assert event["claimed_payment_id"] == str(payment.id)
    assert event["provider"] == PROVIDER
    # No event_id in the seed's payload: the body's hash identifies the event.
    assert event["provider_event_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert event["event_type"] == "payment.completed"
    assert event["raw_body"] == raw  # the exact bytes, stray "1" included
    assert event["headers"] == envelope.payload.headers
    assert event["signature_scheme"] == "seed"
    assert event["processed_at"] is not None
    assert event["next_attempt_at"] is None
    assert (await payment_row(db, payment.id))["status"] == "completed"
    assert await audit(db, payment.id) == [CREATED, ("pending", "completed", True, "webhook")]
    inbox = await db.fetch("SELECT message_id, message_type FROM webhooks.inbox")
    assert [tuple(r) for r in inbox] == [(envelope.message_id, "webhook.received")]


async def test_resent_body_is_a_duplicate_and_redelivery_changes_nothing(db: Database) -> None:
    payment = await add_payment(db)
    raw = webhook_body(str(payment.id), payment.reference)
    first = received(raw)
    assert await handle(db, first) == "applied"
    [stored] = await events(db)

    # The provider sends the same webhook again: a new message with the same bytes.
    resent = received(raw)
    assert resent.message_id != first.message_id
    assert await handle(db, resent) == "duplicate"

    [event] = await events(db)
    assert event["duplicates"] == 1
    assert event["last_duplicate_at"] is not None
    unchanged = {"duplicates", "last_duplicate_at"}
    assert {k: v for k, v in event.items() if k not in unchanged} == {
        k: v for k, v in stored.items() if k not in unchanged
    }
    assert (await payment_row(db, payment.id))["status"] == "completed"
    assert await audit(db, payment.id) == [CREATED, ("pending", "completed", True, "webhook")]

    # RabbitMQ delivers either message again (its ack was lost): nothing at all changes.
    before = await snapshot(db)
    assert await handle(db, resent) == "redelivered"
    assert await handle(db, first) == "redelivered"
    assert await snapshot(db) == before


async def test_one_batch_sorts_out_resends_redeliveries_and_several_payments(
    db: Database,
) -> None:
    """What one batch holds is handled as if its messages came one after the other."""
    one, two, orphan = await add_payment(db), await add_payment(db), uuid.uuid4()
    first = received(webhook_body(str(one.id), one.reference))
    resent = received(webhook_body(str(one.id), one.reference))
    wrong = received(webhook_body(str(two.id), "PAY-NOT-ITS-OWN"))
    settles_two = received(webhook_body(str(two.id), two.reference, "payment.failed"))
    early = received(webhook_body(str(orphan), "PAY-NOT-YET"))
    before = _outcome_counts()

    await WebhookIntake(db).handle_batch([first, resent, first, wrong, settles_two, early])

    assert _counted_since(before) == {
        "applied": 2,
        "duplicate": 1,
        "redelivered": 1,
        "rejected": 1,
        "orphaned": 1,
    }
    assert (await payment_row(db, one.id))["status"] == "completed"
    assert (await payment_row(db, two.id))["status"] == "failed"
    by_payment = {e["claimed_payment_id"]: e for e in await events(db) if e["duplicates"]}
    assert by_payment[str(one.id)]["duplicates"] == 1
    assert await audit(db, one.id) == [CREATED, ("pending", "completed", True, "webhook")]
    # Each audit row carries the correlation id of its own message, not the batch's.
    for payment, message in ((one, first), (two, settles_two)):
        traced = await db.fetchrow(
            "SELECT correlation_id FROM payments.payment_events"
            " WHERE payment_id = $1 AND source = 'webhook'",
            payment.id,
        )
        assert traced is not None
        assert traced["correlation_id"] == message.correlation_id


async def test_event_id_identifies_the_event_whatever_the_bytes(db: Database) -> None:
    payment = await add_payment(db)
    raw = webhook_body(str(payment.id), payment.reference, event_id="evt_1", trailing="")
    # Same event, serialised differently by the provider (extra field, whitespace).
    reworded = webhook_body(
        str(payment.id), payment.reference, event_id="evt_1", trailing="\n", note="retry"
    )
    assert raw != reworded

    assert await handle(db, received(raw)) == "applied"
    assert await handle(db, received(reworded)) == "duplicate"

    [event] = await events(db)
    assert event["provider_event_id"] == "evt_1"
    assert event["raw_body"] == raw  # the first copy is the one kept
    assert event["duplicates"] == 1
    assert await audit(db, payment.id) == [CREATED, ("pending", "completed", True, "webhook")]

    # The same event id from another provider is another event (refused: already completed).
    other = webhook_body(str(payment.id), payment.reference, event_id="evt_1", provider="other")
    assert await handle(db, received(other)) == "refused"
    assert [(e["provider"], e["provider_event_id"], e["duplicates"]) for e in await events(db)] == [
        (PROVIDER, "evt_1", 1),
        ("other", "evt_1", 0),
    ]


async def test_reference_mismatch_is_rejected(db: Database) -> None:
    payment = await add_payment(db)
    raw = webhook_body(str(payment.id), "PAY-SOMEONEELS")

    assert await handle(db, received(raw)) == "rejected"

    [event] = await events(db)
    assert event["status"] == "rejected"
    assert "PAY-SOMEONEELS" in event["error"]
    assert payment.reference in event["error"]
    assert event["payment_id"] == payment.id
    assert event["next_attempt_at"] is None
    assert (await payment_row(db, payment.id))["status"] == "pending"
    assert await audit(db, payment.id) == [CREATED]


async def test_payment_id_that_is_not_a_uuid_is_rejected(db: Database) -> None:
    raw = webhook_body("pay_123", "PAY-0000000001")

    assert await handle(db, received(raw)) == "rejected"

    [event] = await events(db)
    assert event["status"] == "rejected"
    assert event["claimed_payment_id"] == "pay_123"
    assert event["payment_id"] is None
    assert "pay_123" in event["error"]
    assert event["next_attempt_at"] is None


async def test_unknown_event_type_is_ignored(db: Database) -> None:
    payment = await add_payment(db)
    raw = webhook_body(str(payment.id), payment.reference, "payment.disputed")

    assert await handle(db, received(raw)) == "ignored"

    [event] = await events(db)
    assert event["status"] == "ignored"
    assert event["event_type"] == "payment.disputed"
    assert "payment.disputed" in event["error"]
    assert (await payment_row(db, payment.id))["status"] == "pending"
    assert await audit(db, payment.id) == [CREATED]


@pytest.mark.parametrize(("first", "late"), [(P.COMPLETED, P.FAILED), (P.FAILED, P.COMPLETED)])
async def test_late_event_after_a_final_one_is_refused_and_recorded(
    db: Database, first: PaymentStatus, late: PaymentStatus
) -> None:
    payment = await add_payment(db)
    # Both carry a decline reason; only an applied `failed` may use it.
    settled = webhook_body(
        str(payment.id), payment.reference, f"payment.{first}", event_id="evt_1", decline_reason="x"
    )
    too_late = webhook_body(
        str(payment.id), payment.reference, f"payment.{late}", event_id="evt_2", decline_reason="y"
    )

    assert await handle(db, received(settled)) == "applied"
    assert await handle(db, received(too_late)) == "refused"

    statuses = {e["provider_event_id"]: (e["status"], e["error"]) for e in await events(db)}
    assert statuses == {
        "evt_1": ("applied", None),
        "evt_2": ("refused", f"not allowed from {first} to {late}"),
    }
    assert await payment_row(db, payment.id) == {
        "status": first,
        "provider_reference": None,
        "failure_reason": "x" if first is P.FAILED else None,
    }
    assert await audit(db, payment.id) == [
        CREATED,
        ("pending", first, True, "webhook"),
        (first, late, False, "webhook"),
    ]
    refusal = await db.fetchrow(
        "SELECT reason FROM payments.payment_events WHERE payment_id = $1 AND NOT applied",
        payment.id,
    )
    assert refusal is not None
    assert refusal["reason"].startswith(f"refused: not allowed from {first}")
    assert "evt_2" in refusal["reason"]


@pytest.mark.parametrize(
    ("decline_reason", "failure_reason"),
    [("insufficient_funds", "insufficient_funds"), (None, "declined by the provider")],
)
async def test_failed_event_gives_the_payment_its_decline_reason(
    db: Database, decline_reason: str | None, failure_reason: str
) -> None:
    payment = await add_payment(db)
    data = {"provider_reference": "ch_42"}
    if decline_reason is not None:
        data["decline_reason"] = decline_reason
    raw = webhook_body(str(payment.id), payment.reference, "payment.failed", **data)

    assert await handle(db, received(raw)) == "applied"

    assert await payment_row(db, payment.id) == {
        "status": "failed",
        "provider_reference": "ch_42",
        "failure_reason": failure_reason,
    }
    assert await audit(db, payment.id) == [CREATED, ("pending", "failed", True, "webhook")]


async def force_due(db: Database) -> None:
    """Pretend the orphans' retry delay has passed."""
    await db.transaction(
        lambda conn: conn.execute(
            "UPDATE webhooks.webhook_events SET next_attempt_at = now() - interval '1 second'"
            " WHERE next_attempt_at IS NOT NULL"
        )
    )


async def test_orphan_is_applied_once_its_payment_appears(db: Database) -> None:
    payment_id = uuid.uuid4()
    reference = f"PAY-{payment_id.hex[:10].upper()}"
    raw = webhook_body(str(payment_id), reference, event_id="evt_early")

    assert await handle(db, received(raw)) == "orphaned"

    [event] = await events(db)
    assert event["status"] == "orphaned"
    assert event["payment_id"] is None
    assert event["claimed_payment_id"] == str(payment_id)
    assert str(payment_id) in event["error"]
    assert event["attempts"] == 1
    assert event["next_attempt_at"] is not None
    assert event["next_attempt_at"] > event["processed_at"]
    assert await retry_orphans(db, batch_size=10) == 0  # not due yet

    # The payment appears; the orphan is applied at its next attempt, not before.
    payment = await add_payment(db, payment_id)
    assert payment.reference == reference
    assert await retry_orphans(db, batch_size=10) == 0
    assert (await payment_row(db, payment_id))["status"] == "pending"
    await force_due(db)
    before = _outcome_counts()
    assert await retry_orphans(db, batch_size=10) == 1
    assert _counted_since(before) == {"applied_on_retry": 1}

    [event] = await events(db)
    assert event["status"] == "applied"
    assert event["error"] is None
    assert event["payment_id"] == payment_id
    assert event["attempts"] == 2
    assert event["next_attempt_at"] is None
    assert (await payment_row(db, payment_id))["status"] == "completed"
    assert await audit(db, payment_id) == [CREATED, ("pending", "completed", True, "webhook")]
    await force_due(db)
    assert await retry_orphans(db, batch_size=10) == 0


async def set_charge(db: Database, payment_id: uuid.UUID, charge: str) -> None:
    await db.transaction(
        lambda conn: conn.execute(
            "UPDATE payments.payments SET provider = 'simulated', provider_reference = $2"
            " WHERE id = $1",
            payment_id,
            charge,
        )
    )


async def test_charge_of_another_payment_is_rejected(db: Database) -> None:
    other = await add_payment(db)
    await set_charge(db, other.id, "ch_1")
    payment = await add_payment(db)
    await set_charge(db, payment.id, "ch_2")

    wrong = webhook_body(str(payment.id), payment.reference, provider_reference="ch_1")
    assert await handle(db, received(wrong)) == "rejected"

    [event] = await events(db)
    assert "not the payment's charge" in event["error"]
    assert (await payment_row(db, payment.id))["status"] == "pending"


async def test_charge_taken_by_another_payment_is_rejected_before_any_write(db: Database) -> None:
    """The unique (provider, provider_reference) index must never abort the transaction."""
    other = await add_payment(db)
    await set_charge(db, other.id, "ch_1")
    payment = await add_payment(db)
    await db.transaction(
        lambda conn: conn.execute(
            "UPDATE payments.payments SET provider = 'simulated' WHERE id = $1", payment.id
        )
    )

    raw = webhook_body(str(payment.id), payment.reference, provider_reference="ch_1")
    assert await handle(db, received(raw)) == "rejected"
    [event] = await events(db)
    assert "another payment's charge" in event["error"]


async def test_an_orphan_that_fails_does_not_hold_up_the_others(db: Database) -> None:
    first_id, second_id = uuid.uuid4(), uuid.uuid4()
    bad_raw = webhook_body(str(first_id), "PAY-X", event_id="evt_bad")
    good_raw = webhook_body(
        str(second_id), f"PAY-{second_id.hex[:10].upper()}", event_id="evt_good"
    )
    assert await handle(db, received(bad_raw)) == "orphaned"
    assert await handle(db, received(good_raw)) == "orphaned"
    # The first orphan's body is damaged in storage: retrying it fails every time.
    await db.transaction(
        lambda conn: conn.execute(
            "UPDATE webhooks.webhook_events SET raw_body = '\\x00'::bytea"
            " WHERE provider_event_id = 'evt_bad'"
        )
    )
    await add_payment(db, second_id)
    await force_due(db)

    assert await retry_orphans(db, batch_size=10) == 2

    statuses = {e["provider_event_id"]: e for e in await events(db)}
    assert statuses["evt_good"]["status"] == "applied"
    bad = statuses["evt_bad"]
    assert bad["status"] == "orphaned"
    assert bad["error"].startswith("retry failed")
    assert bad["next_attempt_at"] is not None


async def test_orphan_whose_payment_never_appears_stops_being_retried(db: Database) -> None:
    payment_id = uuid.uuid4()
    raw = webhook_body(str(payment_id), "PAY-NEVER00001", event_id="evt_lost")
    assert await handle(db, received(raw)) == "orphaned"

    delays = []
    for _ in range(ORPHAN_ATTEMPTS + 2):
        [event] = await events(db)
        if event["next_attempt_at"] is None:
            break
        delays.append((event["next_attempt_at"] - event["processed_at"]).total_seconds())
        await force_due(db)
        assert await retry_orphans(db, batch_size=10) == 1

    [event] = await events(db)
    assert event["status"] == "orphaned"
    assert event["attempts"] == ORPHAN_ATTEMPTS
    assert event["next_attempt_at"] is None
    assert event["payment_id"] is None
    # The delay grows with each attempt (2, 4, 8, ... seconds, capped).
    assert len(delays) == ORPHAN_ATTEMPTS - 1
    assert delays == sorted(delays)
    assert delays[0] == 2
    assert await retry_orphans(db, batch_size=10) == 0


@pytest.mark.parametrize(
    "raw",
    [b"not json at all", b"\xff\xfe{}", b"[1, 2, 3]", b'{"payment_id": "p1"}', b""],
    ids=["not-json", "not-utf8", "not-an-object", "no-event-type", "empty"],
)
async def test_unreadable_body_is_poison_and_stores_nothing(db: Database, raw: bytes) -> None:
    with pytest.raises(PoisonMessage):
        await WebhookIntake(db).handle(received(raw))
    assert await events(db) == []
    assert await db.fetch("SELECT 1 FROM webhooks.inbox") == []


# --- any order, any duplicates -----------------------------------------------------------------

LIFECYCLES = (
    (P.PROCESSING, P.COMPLETED),
    (P.PROCESSING, P.FAILED),
    (P.PROCESSING, P.COMPLETED, P.REFUNDED),
)


Case = tuple[tuple[PaymentStatus, ...], list[int], list[int]]


@st.composite
def deliveries(draw: st.DrawFn) -> Case:
    """A lifecycle, the order its events arrive in (by index, repeats = resends), and how
    the consumer groups them into batches (sizes; 1s are the one-by-one path)."""
    lifecycle = draw(st.sampled_from(LIFECYCLES))
    resends = draw(st.lists(st.integers(0, len(lifecycle) - 1), max_size=6))
    order = list(draw(st.permutations([*range(len(lifecycle)), *resends])))
    sizes: list[int] = []
    while sum(sizes) < len(order):
        sizes.append(draw(st.integers(1, len(order) - sum(sizes))))
    return lifecycle, order, sizes


async def deliver(
    db: Database,
    lifecycle: tuple[PaymentStatus, ...],
    order: list[int],
    batch_sizes: list[int] | None = None,
) -> Payment:
    """A new payment, then its lifecycle's events (one event id each) in `order`, in
    batches of `batch_sizes` (one by one without)."""
    payment = await add_payment(db)
    bodies = [
        webhook_body(
            str(payment.id),
            payment.reference,
            f"payment.{status}",
            event_id=f"evt_{payment.id.hex}_{i}",
            provider_reference=f"ch_{payment.id.hex[:12]}",
        )
        for i, status in enumerate(lifecycle)
    ]
    intake = WebhookIntake(db)
    messages = [received(bodies[index]) for index in order]
    for size in batch_sizes or [1] * len(messages):
        batch, messages = messages[:size], messages[size:]
        await intake.handle_batch(batch)
    return payment


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=deliveries())
async def test_any_order_with_duplicates_in_any_batches_ends_where_in_order_delivery_does(
    db: Database, case: Case
) -> None:
    lifecycle, order, batch_sizes = case
    in_order = await deliver(db, lifecycle, list(range(len(lifecycle))))
    payment = await deliver(db, lifecycle, order, batch_sizes)

    final = (await payment_row(db, payment.id))["status"]
    assert final == (await payment_row(db, in_order.id))["status"] == lifecycle[-1]

    # Every event stored once, each resend counted on it.
    rows = await db.fetch(
        "SELECT provider_event_id, status, attempts, duplicates FROM webhooks.webhook_events"
        " WHERE claimed_payment_id = $1",
        str(payment.id),
    )
    stored = {row["provider_event_id"]: dict(row) for row in rows}
    assert len(rows) == len(stored) == len(lifecycle)
    trail = await db.fetch(
        "SELECT from_status, to_status, applied, source FROM payments.payment_events"
        " WHERE payment_id = $1 ORDER BY id",
        payment.id,
    )
    for i, target in enumerate(lifecycle):
        event = stored[f"evt_{payment.id.hex}_{i}"]
        assert event["duplicates"] == order.count(i) - 1
        assert event["attempts"] == 1
        assert event["status"] in {"applied", "refused"}
        # Each event's transition, applied or refused, is in the audit trail exactly once
        # (a lifecycle's events all have different targets).
        [row] = [r for r in trail if r["source"] == "webhook" and r["to_status"] == target]
        assert row["applied"] is (event["status"] == "applied")

    # The applied rows form one forward path from pending to the final status, each
    # status reached exactly once.
    path = [(r["from_status"], r["to_status"]) for r in trail if r["applied"]]
    reached = [to for _, to in path]
    assert reached[0] == "pending"
    assert reached[-1] == final
    assert len(set(reached)) == len(reached)
    assert [frm for frm, _ in path] == [None, *reached[:-1]]
