"""Refunds: how the simulated PSP creates, finds and settles them.

A refund gives back part or all of a succeeded charge. It is created once per
Idempotency-Key (the merchant's refund id): the charge's row is locked first, so two
requests for one charge (the same key twice, or two keys) take turns, and each sees what
the other committed. Under that lock the provider checks that the charge succeeded and
that its refunds not failed never add up to more than the charge: the provider's own
guarantee, whatever the merchant asks.

A refund settles later, in the background, like a charge: the transaction that gives it
its final status (succeeded, or failed at PROVIDER_REFUND_DECLINE_RATE) queues its
webhook (`refund.succeeded` or `refund.failed`), which goes out through the same delivery
loop as the charges' (with its drops, duplicates and retries).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import secrets
from typing import Annotated, Any

import asyncpg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from libs.common.db import Connection, Database
from libs.common.logs import get_correlation_id
from services.provider.charges import (
    _MAX_BIGINT,
    PROVIDER_NAME,
    ChargeStatus,
    IdempotencyKeyReused,
    _no_nul,
    new_event_id,
)
from services.provider.metrics import REFUNDS_CREATED, REFUNDS_SETTLED
from services.provider.simulation import Simulation

log = logging.getLogger(__name__)

SETTLE_BATCH_SIZE = 100


class RefundStatus(enum.StrEnum):
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


DECLINED_REASON = "refund_declined"

EVENT_TYPES = {
    RefundStatus.SUCCEEDED: "refund.succeeded",
    RefundStatus.FAILED: "refund.failed",
}


class RefundRequest(BaseModel):
    """The body of `POST /refunds`, exactly: no extra fields, no coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    charge_id: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_nul)]
    # The merchant's refund id, echoed on the refund's webhooks.
    reference: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_nul)]
    amount_minor: int = Field(gt=0, le=_MAX_BIGINT)
    currency: str = Field(pattern=r"^[A-Z]{3}$")

    def fingerprint(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class RefundRefused(Exception):
    """The charge cannot be refunded as asked; asking again the same way cannot help."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True, slots=True)
class Refund:
    id: str
    charge_id: str
    payment_id: str
    reference: str
    amount_minor: int
    currency: str
    status: RefundStatus
    failure_reason: str | None
    created_at: dt.datetime
    settled_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Refund:
        return cls(
            id=row["id"],
            charge_id=row["charge_id"],
            payment_id=str(row["payment_id"]),
            reference=row["reference"],
            amount_minor=row["amount_minor"],
            currency=row["currency"],
            status=RefundStatus(row["status"]),
            failure_reason=row["failure_reason"],
            created_at=row["created_at"],
            settled_at=row["settled_at"],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class CreateResult:
    refund: Refund
    replayed: bool


def new_refund_id() -> str:
    return "re_" + secrets.token_hex(12)


_COLUMNS = """
    r.id, r.charge_id, c.payment_id, r.reference, r.amount_minor, r.currency, r.status,
    r.failure_reason, r.created_at, r.settled_at
"""

_BY_KEY_SQL = f"""
SELECT {_COLUMNS}, r.request_hash
  FROM provider.refunds r JOIN provider.charges c ON c.id = r.charge_id
 WHERE r.idempotency_key = $1
"""  # noqa: S608 - the column list is a constant, every value a parameter

_BY_ID_SQL = f"""
SELECT {_COLUMNS} FROM provider.refunds r JOIN provider.charges c ON c.id = r.charge_id
 WHERE r.id = $1
"""  # noqa: S608 - same

_FIND_SQL = f"""
SELECT {_COLUMNS} FROM provider.refunds r JOIN provider.charges c ON c.id = r.charge_id
 WHERE ($1::text IS NULL OR r.reference = $1) AND ($2::text IS NULL OR r.charge_id = $2)
 ORDER BY r.created_at, r.id
"""  # noqa: S608 - same

_LOCK_CHARGE_SQL = """
SELECT id, payment_id, reference, amount_minor, currency, status, correlation_id
  FROM provider.charges WHERE id = $1 FOR UPDATE
"""

_REFUNDED_SQL = """
SELECT coalesce(sum(amount_minor), 0)::bigint FROM provider.refunds
 WHERE charge_id = $1 AND status <> 'failed'
"""

_INSERT_SQL = f"""
WITH inserted AS (
    INSERT INTO provider.refunds
        (id, idempotency_key, request_hash, charge_id, reference, amount_minor, currency,
         status, settle_at, correlation_id)
    VALUES ($1, $2, $3, $4, $5, $6, $7, 'processing',
            now() + make_interval(secs => $8::double precision), $9)
    RETURNING *
)
SELECT {_COLUMNS} FROM inserted r JOIN provider.charges c ON c.id = r.charge_id
"""  # noqa: S608 - same


async def create_refund(
    db: Database, simulation: Simulation, idempotency_key: str, request: RefundRequest
) -> CreateResult:
    """Create the refund for `idempotency_key`, or return the one it already created.

    Raises IdempotencyKeyReused when the key's first request had another body, and
    RefundRefused when the charge cannot give back what is asked."""
    fingerprint = request.fingerprint()

    async def create(conn: Connection) -> CreateResult:
        charge = await conn.fetchrow(_LOCK_CHARGE_SQL, request.charge_id)
        existing = await conn.fetchrow(_BY_KEY_SQL, idempotency_key)
        if existing is not None:
            if existing["request_hash"] != fingerprint:
                raise IdempotencyKeyReused(idempotency_key)
            return CreateResult(Refund.from_row(existing), replayed=True)
        if charge is None:
            raise RefundRefused(404, "charge_not_found", f"There is no charge {request.charge_id}.")
        if charge["status"] != ChargeStatus.SUCCEEDED:
            raise RefundRefused(
                409,
                "charge_not_refundable",
                f"Charge {request.charge_id} is {charge['status']}; only a succeeded charge"
                " can be refunded.",
            )
        if request.currency != charge["currency"]:
            raise RefundRefused(
                422,
                "currency_mismatch",
                f"Charge {request.charge_id} is in {charge['currency']}, not {request.currency}.",
            )
        refunded = await conn.fetchval(_REFUNDED_SQL, request.charge_id)
        left = charge["amount_minor"] - refunded
        if request.amount_minor > left:
            raise RefundRefused(
                422,
                "amount_exceeds_refundable",
                f"Charge {request.charge_id} has {left} (minor units) left to refund,"
                f" less than {request.amount_minor}.",
            )
        row = await conn.fetchrow(
            _INSERT_SQL,
            new_refund_id(),
            idempotency_key,
            fingerprint,
            request.charge_id,
            request.reference,
            request.amount_minor,
            request.currency,
            simulation.settle_delay_ms / 1000,
            get_correlation_id() or charge["correlation_id"],
        )
        if row is None:
            raise RuntimeError(f"refund for key {idempotency_key!r} was not inserted")
        return CreateResult(Refund.from_row(row), replayed=False)

    try:
        result = await db.transaction(create)
    except asyncpg.UniqueViolationError:
        # The same key for another charge, committed between our look-up and insert (the
        # charge lock only serializes requests for one charge): read the winner's.
        result = await db.transaction(lambda conn: _replay(conn, idempotency_key, fingerprint))
    if not result.replayed:
        REFUNDS_CREATED.inc()
        log.info(
            "refund created",
            extra={
                "refund_id": result.refund.id,
                "charge_id": result.refund.charge_id,
                "amount_minor": result.refund.amount_minor,
            },
        )
    return result


async def _replay(conn: Connection, idempotency_key: str, fingerprint: str) -> CreateResult:
    existing = await conn.fetchrow(_BY_KEY_SQL, idempotency_key)
    if existing is None:
        raise RuntimeError(f"idempotency key {idempotency_key!r} conflicted but has no refund")
    if existing["request_hash"] != fingerprint:
        raise IdempotencyKeyReused(idempotency_key)
    return CreateResult(Refund.from_row(existing), replayed=True)


async def get_refund(db: Database, refund_id: str) -> Refund | None:
    row = await db.fetchrow(_BY_ID_SQL, refund_id)
    return None if row is None else Refund.from_row(row)


async def find_refunds(
    db: Database, *, reference: str | None = None, charge_id: str | None = None
) -> list[Refund]:
    """The refunds with this merchant reference and/or of this charge, oldest first."""
    rows = await db.fetch(_FIND_SQL, reference, charge_id)
    return [Refund.from_row(row) for row in rows]


def webhook_body(event_id: str, refund: Refund, payment_reference: str) -> bytes:
    """The event announcing a settled refund, as the exact bytes signed and sent.

    In the charges' shape, so a merchant reads both the same way: payment_id and
    data.reference name the payment, data.provider_reference its charge."""
    if refund.settled_at is None:
        raise ValueError(f"refund {refund.id} has not settled")
    event: dict[str, Any] = {
        "event_id": event_id,
        "event_type": EVENT_TYPES[refund.status],
        "payment_id": refund.payment_id,
        "provider": PROVIDER_NAME,
        "data": {
            "reference": payment_reference,
            "provider_reference": refund.charge_id,
            "refund_id": refund.reference,
            "provider_refund_id": refund.id,
            "amount_minor": refund.amount_minor,
            "currency": refund.currency,
            "status": refund.status.value,
            "failure_reason": refund.failure_reason,
        },
        "created_at": refund.settled_at.isoformat(),
    }
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


_DUE_SQL = f"""
SELECT {_COLUMNS}, c.reference AS payment_reference, now() AS now
  FROM provider.refunds r JOIN provider.charges c ON c.id = r.charge_id
 WHERE r.status = 'processing' AND r.settle_at <= now()
 ORDER BY r.settle_at
 LIMIT $1
 FOR UPDATE OF r SKIP LOCKED
"""  # noqa: S608 - the column list is a constant

_SETTLE_SQL = """
UPDATE provider.refunds AS r
   SET status = s.status, failure_reason = s.failure_reason, settled_at = now()
  FROM unnest($1::text[], $2::text[], $3::text[]) AS s(id, status, failure_reason)
 WHERE r.id = s.id
"""

_QUEUE_WEBHOOKS_SQL = """
INSERT INTO provider.webhook_deliveries (id, charge_id, refund_id, event_type, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[])
"""


async def settle_due(
    db: Database, simulation: Simulation, *, batch_size: int = SETTLE_BATCH_SIZE
) -> int:
    """Give up to `batch_size` due refunds their final status, each with its webhook queued
    in the same transaction; return how many settled."""

    async def settle(conn: Connection) -> list[Refund]:
        settled: list[tuple[Refund, str]] = []
        for row in await conn.fetch(_DUE_SQL, batch_size):
            declined = simulation.refund_declines()
            refund = dataclasses.replace(
                Refund.from_row(row),
                status=RefundStatus.FAILED if declined else RefundStatus.SUCCEEDED,
                failure_reason=DECLINED_REASON if declined else None,
                settled_at=row["now"],
            )
            settled.append((refund, row["payment_reference"]))
        if not settled:
            return []
        await conn.execute(
            _SETTLE_SQL,
            [refund.id for refund, _ in settled],
            [refund.status.value for refund, _ in settled],
            [refund.failure_reason for refund, _ in settled],
        )
        event_ids = [new_event_id() for _ in settled]
        await conn.execute(
            _QUEUE_WEBHOOKS_SQL,
            event_ids,
            [refund.charge_id for refund, _ in settled],
            [refund.id for refund, _ in settled],
            [EVENT_TYPES[refund.status] for refund, _ in settled],
            [
                webhook_body(event_id, refund, reference)
                for event_id, (refund, reference) in zip(event_ids, settled, strict=True)
            ],
        )
        return [refund for refund, _ in settled]

    settled = await db.transaction(settle)
    for refund in settled:
        REFUNDS_SETTLED.labels(status=refund.status.value).inc()
    if settled:
        log.info("refunds settled", extra={"count": len(settled)})
    return len(settled)
