"""Test setup through the payments data's owner (libs.common.state_machine), one at a time."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from libs.common.db import Connection
from libs.common.state_machine import (
    NewPayment,
    Transition,
    TransitionRequest,
    apply_transitions,
    create_payments,
)
from libs.common.states import PaymentStatus, TransitionSource


async def create_payment(
    conn: Connection,
    payment_id: uuid.UUID,
    *,
    reference: str | None = None,
    amount_minor: int = 10000,
    currency: str = "USD",
    customer_id: str = "test_customer",
    created_at: dt.datetime | None = None,
    source: TransitionSource = TransitionSource.API,
) -> None:
    """A pending payment with its creation audit row, as the payments service stores it."""
    await create_payments(
        conn,
        [
            NewPayment(
                id=payment_id,
                reference=reference or f"PAY-{payment_id.hex[:10].upper()}",
                amount_minor=amount_minor,
                currency=currency,
                customer_id=customer_id,
                created_at=created_at,
            )
        ],
        source=source,
    )


async def move_to(
    conn: Connection,
    payment_id: uuid.UUID,
    to_status: PaymentStatus,
    *,
    source: TransitionSource,
    **fields: Any,
) -> Transition:
    """One move through the state machine (reason, provider, … as keywords)."""
    (result,) = await apply_transitions(
        conn, [TransitionRequest(payment_id, to_status, source, **fields)]
    )
    return result
