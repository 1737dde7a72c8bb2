"""The lifecycle rules as data (the database behaviour is in integration/test_state_machine)."""

from __future__ import annotations

from libs.common.states import ALLOWED_FROM, PaymentStatus

P = PaymentStatus
# The statuses nothing moves on from.
TERMINAL = frozenset(s for s in P if not any(s in froms for froms in ALLOWED_FROM.values()))


def is_allowed(from_status: PaymentStatus, to_status: PaymentStatus) -> bool:
    return from_status in ALLOWED_FROM[to_status]


def test_terminal_statuses() -> None:
    assert frozenset({P.FAILED, P.REFUNDED}) == TERMINAL


def test_nothing_moves_back_to_pending_or_stays_put() -> None:
    for status in PaymentStatus:
        assert not is_allowed(status, P.PENDING)
        assert not is_allowed(status, status)


def test_completed_and_failed_never_cross() -> None:
    assert not is_allowed(P.COMPLETED, P.FAILED)
    assert not is_allowed(P.FAILED, P.COMPLETED)
    assert not is_allowed(P.FAILED, P.REFUNDED)
