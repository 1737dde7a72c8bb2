"""The payment lifecycle as data: statuses, who may move them, and which moves are allowed.

    pending ──> processing ──> completed ──> partially_refunded ──> refunded
       │  │          │             │               ↺                 ▲
       │  └──────────┴─> failed    └─────────────────────────────────┘
       └──> canceled (only before the provider was asked to charge)

A payment only ever moves forward. Moves that skip a step are allowed because events
race: the provider's "completed" webhook may arrive before the payments service has
recorded "processing", and a refund proves the charge completed. Everything else,
including a move to the status a payment already has, is refused (and recorded), with
one exception: partially_refunded → partially_refunded. Each partial refund that
succeeds is a move of its own, with its own audit row and event, while the payment stays
partially refunded; it is asked for only by the refund's own pending → succeeded
settlement, which is conditional, so a duplicate refund webhook cannot repeat it.

`canceled` is reachable only from `pending`, and only while the payments service has not
claimed the payment for charging (payments.payments.charge_requested_at, see
libs.common.refunds.cancel_payment): that guard is not a status, so it is not in this table.
"""

from __future__ import annotations

import enum


class PaymentStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    CANCELED = "canceled"


class TransitionSource(enum.StrEnum):
    API = "api"
    PROVIDER = "provider"
    WEBHOOK = "webhook"
    RECONCILER = "reconciler"


_P = PaymentStatus

# For each target status, the statuses a payment may be in to move there.
ALLOWED_FROM: dict[PaymentStatus, frozenset[PaymentStatus]] = {
    _P.PENDING: frozenset(),
    _P.PROCESSING: frozenset({_P.PENDING}),
    _P.COMPLETED: frozenset({_P.PENDING, _P.PROCESSING}),
    _P.FAILED: frozenset({_P.PENDING, _P.PROCESSING}),
    _P.PARTIALLY_REFUNDED: frozenset({_P.COMPLETED, _P.PARTIALLY_REFUNDED}),
    _P.REFUNDED: frozenset({_P.PENDING, _P.PROCESSING, _P.COMPLETED, _P.PARTIALLY_REFUNDED}),
    _P.CANCELED: frozenset({_P.PENDING}),
}

# The statuses a payment may be refunded from (the API answers 409 for any other).
REFUNDABLE = frozenset({_P.COMPLETED, _P.PARTIALLY_REFUNDED})


class RefundStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
