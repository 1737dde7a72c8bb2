"""The lifecycle rules as data (the database behaviour is in integration/test_state_machine)."""

from __future__ import annotations

from libs.common.states import ALLOWED_FROM, PaymentStatus

P = PaymentStatus
# The statuses nothing moves on from.
TERMINAL = frozenset(s for s in P if not any(s in froms for froms in ALLOWED_FROM.values()))


def is_allowed(from_status: PaymentStatus, to_status: PaymentStatus) -> bool:
    return from_status in ALLOWED_FROM[to_status]


def test_terminal_statuses() -> None:
    assert frozenset({P.FAILED, P.REFUNDED, P.CANCELED}) == TERMINAL


def test_nothing_moves_back_to_pending_or_stays_put() -> None:
    for status in PaymentStatus:
        assert not is_allowed(status, P.PENDING)
        # Each partial refund is a move of its own (see libs.common.states).
        assert is_allowed(status, status) == (status is P.PARTIALLY_REFUNDED)


def test_refunds_move_forward_only() -> None:
    assert is_allowed(P.COMPLETED, P.PARTIALLY_REFUNDED)
    assert is_allowed(P.COMPLETED, P.REFUNDED)
    assert is_allowed(P.PARTIALLY_REFUNDED, P.REFUNDED)
    assert not is_allowed(P.REFUNDED, P.PARTIALLY_REFUNDED)
    for before in (P.PENDING, P.PROCESSING, P.FAILED, P.CANCELED):
        assert not is_allowed(before, P.PARTIALLY_REFUNDED)


def test_only_a_pending_payment_is_canceled() -> None:
    assert {s for s in PaymentStatus if is_allowed(s, P.CANCELED)} == {P.PENDING}
    for after in PaymentStatus:
        assert not is_allowed(P.CANCELED, after)


def test_completed_and_failed_never_cross() -> None:
    assert not is_allowed(P.COMPLETED, P.FAILED)
    assert not is_allowed(P.FAILED, P.COMPLETED)
    assert not is_allowed(P.FAILED, P.REFUNDED)
