"""Charges: how the simulated PSP creates, finds and settles them.

A charge is created once per Idempotency-Key: the insert is `ON CONFLICT DO NOTHING`
and a losing (or repeated) request reads the winner's row, so concurrent identical
requests make exactly one charge, and a key sent again with another body is refused.
It settles later, in the background, exactly like a real PSP: the same transaction that
gives it its final status queues the webhook that announces it, so a settled charge
without its webhook (or the reverse) cannot exist, whatever crashes when.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import secrets
import uuid
from typing import Annotated, Any

import asyncpg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from libs.common.db import Connection, Database
from libs.common.logs import get_correlation_id
from services.provider.metrics import CHARGES_CREATED, CHARGES_SETTLED
from services.provider.simulation import Simulation

log = logging.getLogger(__name__)

PROVIDER_NAME = "simulated"
SETTLE_BATCH_SIZE = 100
# Customers whose id starts with this are declined at once, so callers can test that path.
DECLINE_PREFIX = "decline"
_MAX_BIGINT = 2**63 - 1


class ChargeStatus(enum.StrEnum):
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"


class DeclineReason(enum.StrEnum):
    CARD_DECLINED = "card_declined"
    INSUFFICIENT_FUNDS = "insufficient_funds"


EVENT_TYPES = {
    ChargeStatus.SUCCEEDED: "payment.completed",
    ChargeStatus.DECLINED: "payment.failed",
}


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refuse it here rather than fail at the insert.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class ChargeRequest(BaseModel):
    """The body of `POST /charges`, exactly: no extra fields, no coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    payment_id: uuid.UUID
    reference: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_nul)]
    amount_minor: int = Field(gt=0, le=_MAX_BIGINT)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    customer_id: Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_nul)]

    def fingerprint(self) -> str:
        """A hash of what was asked, independent of how the JSON was spelled."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Charge:
    id: str
    payment_id: uuid.UUID
    reference: str
    amount_minor: int
    currency: str
    customer_id: str
    status: ChargeStatus
    decline_reason: str | None
    created_at: dt.datetime
    settled_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Charge:
        return cls(
            id=row["id"],
            payment_id=row["payment_id"],
            reference=row["reference"],
            amount_minor=row["amount_minor"],
            currency=row["currency"],
            customer_id=row["customer_id"],
            status=ChargeStatus(row["status"]),
            decline_reason=row["decline_reason"],
            created_at=row["created_at"],
            settled_at=row["settled_at"],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class CreateResult:
    charge: Charge
    # True when the key had been used before with the same body: nothing new was created.
    replayed: bool


class IdempotencyKeyReused(Exception):
    """The Idempotency-Key was first used with a different request body."""


def new_charge_id() -> str:
    return "ch_" + secrets.token_hex(12)


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def webhook_body(event_id: str, charge: Charge) -> bytes:
    """The event announcing a settled charge, as the exact bytes that are signed and sent."""
    if charge.settled_at is None:
        raise ValueError(f"charge {charge.id} has not settled")
    event: dict[str, Any] = {
        "event_id": event_id,
        "event_type": EVENT_TYPES[charge.status],
        "payment_id": str(charge.payment_id),
        "provider": PROVIDER_NAME,
        "data": {
            "reference": charge.reference,
            "provider_reference": charge.id,
            "amount_minor": charge.amount_minor,
            "currency": charge.currency,
            "status": charge.status.value,
            "decline_reason": charge.decline_reason,
        },
        "created_at": charge.settled_at.isoformat(),
    }
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


_COLUMNS = (
    "id, payment_id, reference, amount_minor, currency, customer_id, status, decline_reason,"
    " created_at, settled_at"
)

_INSERT_SQL = f"""
INSERT INTO provider.charges
    (id, idempotency_key, request_hash, payment_id, reference, amount_minor, currency,
     customer_id, status, decline_reason, settle_at, settled_at, correlation_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text, $10,
        now() + make_interval(secs => $11::double precision),
        CASE WHEN $9::text = 'processing' THEN NULL ELSE now() END, $12)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING {_COLUMNS}
"""  # noqa: S608 - the column list is a constant, every value a parameter

_BY_KEY_SQL = f"""
SELECT {_COLUMNS}, request_hash FROM provider.charges WHERE idempotency_key = $1
"""  # noqa: S608 - same

_BY_ID_SQL = f"SELECT {_COLUMNS} FROM provider.charges WHERE id = $1"  # noqa: S608 - same

_BY_PAYMENT_SQL = f"""
SELECT {_COLUMNS} FROM provider.charges WHERE payment_id = $1 ORDER BY created_at, id
"""  # noqa: S608 - same

_QUEUE_WEBHOOKS_SQL = """
INSERT INTO provider.webhook_deliveries (id, charge_id, event_type, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])
"""


async def _queue_webhooks(conn: Connection, settled: list[Charge]) -> None:
    event_ids = [new_event_id() for _ in settled]
    await conn.execute(
        _QUEUE_WEBHOOKS_SQL,
        event_ids,
        [charge.id for charge in settled],
        [EVENT_TYPES[charge.status] for charge in settled],
        [
            webhook_body(event_id, charge)
            for event_id, charge in zip(event_ids, settled, strict=True)
        ],
    )


async def create_charge(
    db: Database, simulation: Simulation, idempotency_key: str, request: ChargeRequest
) -> CreateResult:
    """Create the charge for `idempotency_key`, or return the one it already created.

    Raises IdempotencyKeyReused when the key's first request had another body.
    """
    fingerprint = request.fingerprint()
    declined = request.customer_id.startswith(DECLINE_PREFIX)

    async def create(conn: Connection) -> CreateResult:
        row = await conn.fetchrow(
            _INSERT_SQL,
            new_charge_id(),
            idempotency_key,
            fingerprint,
            request.payment_id,
            request.reference,
            request.amount_minor,
            request.currency,
            request.customer_id,
            (ChargeStatus.DECLINED if declined else ChargeStatus.PROCESSING).value,
            DeclineReason.CARD_DECLINED.value if declined else None,
            0.0 if declined else simulation.settle_delay_ms / 1000,
            get_correlation_id(),
        )
        if row is not None:
            charge = Charge.from_row(row)
            if declined:
                await _queue_webhooks(conn, [charge])
            return CreateResult(charge, replayed=False)
        # Another request holds the key; ON CONFLICT waited for it to commit, so its row
        # is visible to this (READ COMMITTED) statement.
        existing = await conn.fetchrow(_BY_KEY_SQL, idempotency_key)
        if existing is None:
            raise RuntimeError(f"idempotency key {idempotency_key!r} conflicted but has no charge")
        if existing["request_hash"] != fingerprint:
            raise IdempotencyKeyReused(idempotency_key)
        return CreateResult(Charge.from_row(existing), replayed=True)

    # A declined charge queues its webhook in the same transaction; the others are one
    # INSERT (and, for a repeated key, one SELECT), each consistent on its own.
    result = await (db.transaction(create) if declined else db.statement(create))
    if not result.replayed:
        charge = result.charge
        CHARGES_CREATED.labels(outcome="declined" if declined else "accepted").inc()
        if declined:
            CHARGES_SETTLED.labels(status=charge.status.value).inc()
        # DEBUG: at INFO this line was a tenth of the provider's CPU per charge; the
        # payments service logs every charge it records, with the charge id.
        log.debug(
            "charge created",
            extra={
                "charge_id": charge.id,
                "payment_id": str(charge.payment_id),
                "status": charge.status,
            },
        )
    return result


async def get_charge(db: Database, charge_id: str) -> Charge | None:
    row = await db.fetchrow(_BY_ID_SQL, charge_id)
    return None if row is None else Charge.from_row(row)


async def list_charges(db: Database, payment_id: uuid.UUID) -> list[Charge]:
    """Every charge made for `payment_id`, oldest first."""
    rows = await db.fetch(_BY_PAYMENT_SQL, payment_id)
    return [Charge.from_row(row) for row in rows]


_DUE_SQL = f"""
SELECT {_COLUMNS}, now() AS now
  FROM provider.charges
 WHERE status = 'processing' AND settle_at <= now()
 ORDER BY settle_at
 LIMIT $1
 FOR UPDATE SKIP LOCKED
"""  # noqa: S608 - the column list is a constant

_SETTLE_SQL = """
UPDATE provider.charges AS c
   SET status = s.status, decline_reason = s.decline_reason, settled_at = now()
  FROM unnest($1::text[], $2::text[], $3::text[]) AS s(id, status, decline_reason)
 WHERE c.id = s.id
"""


async def settle_due(
    db: Database, simulation: Simulation, *, batch_size: int = SETTLE_BATCH_SIZE
) -> int:
    """Give up to `batch_size` due charges their final status; return how many settled.

    SKIP LOCKED lets several provider replicas settle side by side, each taking other rows.
    """

    async def settle(conn: Connection) -> list[Charge]:
        settled: list[Charge] = []
        for row in await conn.fetch(_DUE_SQL, batch_size):
            declined = simulation.declines()
            settled.append(
                dataclasses.replace(
                    Charge.from_row(row),
                    status=ChargeStatus.DECLINED if declined else ChargeStatus.SUCCEEDED,
                    decline_reason=DeclineReason.INSUFFICIENT_FUNDS.value if declined else None,
                    # The UPDATE's now(): one transaction, one clock reading.
                    settled_at=row["now"],
                )
            )
        if settled:
            await conn.execute(
                _SETTLE_SQL,
                [charge.id for charge in settled],
                [charge.status.value for charge in settled],
                [charge.decline_reason for charge in settled],
            )
            await _queue_webhooks(conn, settled)
        return settled

    settled = await db.transaction(settle)
    for charge in settled:
        CHARGES_SETTLED.labels(status=charge.status.value).inc()
    if settled:
        log.info("charges settled", extra={"count": len(settled)})
    return len(settled)
