"""Submitting a claimed refund to the provider and recording its answer.

Shared by the payments service (on refund.requested) and the reconciler (a stale refund
the provider never saw). The provider's idempotency key is the refund's id, so asking
twice, from either, is one refund at the provider.
"""

from __future__ import annotations

import logging
from typing import Literal

from libs.common.db import Database
from libs.common.provider_client import (
    ProviderClient,
    ProviderRefund,
    ProviderRejected,
    ProviderUnavailable,
)
from libs.common.refunds import ToSubmit, record_provider_refund, settle_refund
from libs.common.states import TransitionSource

log = logging.getLogger(__name__)

# What became of a submission: the provider's answer, or why there is none.
Outcome = Literal["processing", "succeeded", "failed", "unavailable", "rejected"]


async def submit(
    db: Database, provider: ProviderClient, refund: ToSubmit, *, source: TransitionSource
) -> Outcome:
    """Ask the provider for a claimed refund and record its answer."""
    extra = {"refund_id": str(refund.refund_id), "payment_id": str(refund.payment_id)}
    if refund.charge_id is None:
        reason = "the payment has no provider charge to refund"
        await db.transaction(
            lambda conn: settle_refund(
                conn,
                refund.refund_id,
                succeeded=False,
                source=source,
                reason=reason,
                failure_reason=reason,
            )
        )
        log.warning("refund failed: no charge to refund", extra=extra)
        return "rejected"
    try:
        answer = await provider.create_refund(
            refund_id=refund.refund_id,
            charge_id=refund.charge_id,
            amount_minor=refund.amount_minor,
            currency=refund.currency,
        )
    except ProviderUnavailable as exc:
        log.warning(
            "provider unreachable; refund left pending for the reconciler",
            extra={**extra, "error": str(exc)},
        )
        return "unavailable"
    except ProviderRejected as exc:
        failure = f"provider_rejected: {exc}"
        await db.transaction(
            lambda conn: settle_refund(
                conn,
                refund.refund_id,
                succeeded=False,
                source=source,
                reason="refused by the provider",
                failure_reason=failure,
            )
        )
        log.warning(
            "provider refused the refund; refund failed", extra={**extra, "error": str(exc)}
        )
        return "rejected"
    await record(db, refund, answer, source=source)
    log.info(
        "refund submitted",
        extra={**extra, "provider_refund_id": answer.id, "status": answer.status},
    )
    return answer.status


async def record(
    db: Database, refund: ToSubmit, answer: ProviderRefund, *, source: TransitionSource
) -> None:
    """Keep the provider's refund id; settle the refund if the provider already did."""

    if answer.status == "processing":
        await db.statement(lambda conn: record_provider_refund(conn, refund.refund_id, answer.id))
        return
    await db.transaction(
        lambda conn: settle_refund(
            conn,
            refund.refund_id,
            succeeded=answer.status == "succeeded",
            source=source,
            reason=f"provider refund {answer.id} is {answer.status}",
            failure_reason=answer.failure_reason,
            provider_refund_id=answer.id,
        )
    )
