"""The payment lifecycle as data: statuses, who may move them, and which moves are allowed.

    pending ──> processing ──> completed ──> refunded
       │             │
       └─────────────┴──────> failed

A payment only ever moves forward. Moves that skip a step are allowed because events
race: the provider's "completed" webhook may arrive before the payments service has
recorded "processing", and a refund proves the charge completed. Everything else,
including a move to the status a payment already has, is refused (and recorded).
"""

from __future__ import annotations

import enum


class PaymentStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    REFUNDED = "refunded"


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
    _P.REFUNDED: frozenset({_P.PENDING, _P.PROCESSING, _P.COMPLETED}),
}
