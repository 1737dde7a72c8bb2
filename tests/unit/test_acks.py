"""The ack ledger against a model of the broker's rules for one channel's unacked deliveries.

The broker refuses (closing the channel) an ack whose tag is not unacked, with or without
`multiple`; a multiple ack settles every unacked delivery up to its tag. So an ack must
never name a settled tag, and a multiple ack must never reach a delivery still in work.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.broker.acks import Ack, AckLedger


class Broker:
    def __init__(self) -> None:
        self.unacked: set[int] = set()
        self.acked: list[int] = []

    def apply(self, ack: Ack) -> None:
        if ack.tag not in self.unacked:
            raise AssertionError(f"unknown delivery tag {ack.tag}: the channel would close")
        covered = {t for t in self.unacked if t <= ack.tag} if ack.multiple else {ack.tag}
        self.unacked -= covered
        self.acked.extend(sorted(covered))


def test_a_batch_that_finishes_in_order_is_one_frame() -> None:
    ledger = AckLedger()
    for tag in range(1, 65):
        ledger.delivered(tag)
    for tag in range(1, 65):
        ledger.finished(tag)
    acks, acked = ledger.plan()
    assert acks == [Ack(64, multiple=True)]
    assert acked == list(range(1, 65))
    assert len(ledger) == 0


def test_what_finishes_above_one_in_work_is_acked_singly() -> None:
    ledger = AckLedger()
    for tag in (1, 2, 3, 4):
        ledger.delivered(tag)
    ledger.finished(1)
    ledger.finished(3)
    ledger.finished(4)
    assert ledger.plan() == ([Ack(1, multiple=True), Ack(3, False), Ack(4, False)], [1, 3, 4])
    # 2 finishes last: 3 and 4 are settled already, so the ack names 2 alone.
    ledger.finished(2)
    assert ledger.plan() == ([Ack(2, multiple=True)], [2])
    assert len(ledger) == 0


def test_a_multiple_ack_never_names_a_nacked_tag() -> None:
    ledger = AckLedger()
    for tag in (1, 2, 3):
        ledger.delivered(tag)
    ledger.finished(1)
    ledger.finished(2)
    ledger.settled(3)  # requeued by a nack of its own
    assert ledger.plan() == ([Ack(2, multiple=True)], [1, 2])


def test_a_tag_is_finished_once_and_tags_only_grow() -> None:
    ledger = AckLedger()
    ledger.delivered(5)
    with pytest.raises(ValueError, match="tags only grow"):
        ledger.delivered(5)
    ledger.finished(5)
    with pytest.raises(ValueError, match="not in work"):
        ledger.finished(5)
    with pytest.raises(ValueError, match="not in work"):
        ledger.settled(7)


@st.composite
def endings(draw: st.DrawFn) -> tuple[int, list[tuple[int, str, bool]]]:
    """n deliveries; the order they end in, how (ack or nack), and where acks are sent."""
    n = draw(st.integers(min_value=1, max_value=40))
    order = draw(st.permutations(range(1, n + 1)))
    how = draw(st.lists(st.sampled_from(["ack", "ack", "ack", "nack"]), min_size=n, max_size=n))
    flush = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return n, list(zip(order, how, flush, strict=True))


@settings(max_examples=300, deadline=None)
@given(case=endings())
def test_any_order_of_endings_settles_each_delivery_exactly_once(
    case: tuple[int, list[tuple[int, str, bool]]],
) -> None:
    n, steps = case
    ledger = AckLedger()
    broker = Broker()
    delivered = 0
    ended: set[int] = set()
    nacked: set[int] = set()
    for tag, how, flush in steps:
        while delivered < tag:  # deliveries arrive in order, each before it can end
            delivered += 1
            ledger.delivered(delivered)
            broker.unacked.add(delivered)
        if how == "ack":
            ledger.finished(tag)
        else:
            ledger.settled(tag)
            broker.unacked.discard(tag)
            nacked.add(tag)
        ended.add(tag)
        if flush:
            acks, _ = ledger.plan()
            for ack in acks:
                broker.apply(ack)
            in_work = set(range(1, delivered + 1)) - ended
            assert not set(broker.acked) & in_work, "a delivery still in work was acked"
    acks, _ = ledger.plan()
    for ack in acks:
        broker.apply(ack)
    assert sorted(broker.acked) == sorted(set(range(1, n + 1)) - nacked)
    assert not broker.unacked
    assert len(ledger) == 0
