"""Webhook delivery: send each queued event until the merchant accepts it, or give up.

A delivery is claimed in a short transaction that pushes its next_attempt_at past the
longest an attempt can take, so no other worker (or replica) sees it as due while it is
being sent, and no transaction stays open across the HTTP call. The outcome is recorded
afterwards only if the claim is still ours (next_attempt_at unchanged), so a worker that
was presumed dead can never overwrite what its successor recorded. A worker that dies
mid-attempt leaves the claim to expire, and the delivery is simply tried again: webhooks
are at-least-once, and merchants deduplicate on the event id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence

import aiohttp

from libs.common.db import Connection, Database
from libs.common.logs import CORRELATION_HEADER, correlation_scope
from libs.common.signing import signature_headers
from services.provider.metrics import WEBHOOK_DELIVERIES
from services.provider.simulation import Simulation

log = logging.getLogger(__name__)

DELIVERY_BATCH_SIZE = 50
SEND_TIMEOUT_SECONDS = 5.0
# Covers recording the outcome after the sends (a slow database retries for a while).
CLAIM_MARGIN_SECONDS = 50.0
_ERROR_DETAIL_BYTES = 500


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookTarget:
    url: str
    # The first secret signs (see libs.common.signing).
    secrets: Sequence[str]
    timeout_seconds: float = SEND_TIMEOUT_SECONDS

    @property
    def claim_seconds(self) -> float:
        # An attempt is at most two sends (the second one a simulated duplicate).
        return 2 * self.timeout_seconds + CLAIM_MARGIN_SECONDS


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    base_seconds: float = 0.5
    cap_seconds: float = 60.0

    def delay(self, failed_before: int) -> float:
        """Wait before the next attempt, given how many attempts failed before this one."""
        return min(self.base_seconds * 2.0**failed_before, self.cap_seconds)


@dataclasses.dataclass(frozen=True, slots=True)
class _Claimed:
    id: str
    body: bytes
    attempts: int
    correlation_id: str | None
    # The claim's token: the outcome is written only while next_attempt_at still equals it.
    claimed_until: dt.datetime


_CLAIM_SQL = """
WITH due AS (
    SELECT id FROM provider.webhook_deliveries
     WHERE state = 'pending' AND next_attempt_at <= now()
     ORDER BY next_attempt_at
     LIMIT $1
     FOR UPDATE SKIP LOCKED
)
UPDATE provider.webhook_deliveries AS d
   SET next_attempt_at = now() + make_interval(secs => $2::double precision)
  FROM due
 WHERE d.id = due.id
RETURNING d.id, d.body, d.attempts, d.next_attempt_at,
          (SELECT c.correlation_id FROM provider.charges c WHERE c.id = d.charge_id)
              AS correlation_id
"""

_DROP_SQL = """
UPDATE provider.webhook_deliveries
   SET state = 'dropped', last_error = 'dropped by the simulation (PROVIDER_WEBHOOK_DROP_RATE)'
 WHERE id = ANY($1::text[])
"""

_DELIVERED_SQL = """
UPDATE provider.webhook_deliveries
   SET state = 'delivered', attempts = attempts + 1, last_status = $2, last_error = NULL,
       delivered_at = now()
 WHERE id = $1 AND state = 'pending' AND next_attempt_at = $3
"""

_FAILED_SQL = """
UPDATE provider.webhook_deliveries
   SET state = $4::text, attempts = attempts + 1, last_status = $2, last_error = $3,
       next_attempt_at = now() + make_interval(secs => $5::double precision)
 WHERE id = $1 AND state = 'pending' AND next_attempt_at = $6
"""


async def deliver_due(
    db: Database,
    session: aiohttp.ClientSession,
    simulation: Simulation,
    target: WebhookTarget,
    *,
    batch_size: int = DELIVERY_BATCH_SIZE,
    policy: RetryPolicy = RetryPolicy(),
) -> int:
    """Attempt up to `batch_size` due deliveries; return how many were taken (sent or dropped)."""
    claimed, dropped = await _claim(db, simulation, batch_size, target.claim_seconds)
    for _ in dropped:
        WEBHOOK_DELIVERIES.labels(outcome="dropped").inc()
    if dropped:
        log.info("webhooks dropped", extra={"event_ids": dropped})
    outcomes = await _gather_attempts(db, session, simulation, target, policy, claimed)
    for outcome in outcomes:
        WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()
    return len(claimed) + len(dropped)


async def _claim(
    db: Database, simulation: Simulation, batch_size: int, claim_seconds: float
) -> tuple[list[_Claimed], list[str]]:
    async def claim(conn: Connection) -> tuple[list[_Claimed], list[str]]:
        rows = await conn.fetch(_CLAIM_SQL, batch_size, claim_seconds)
        to_send: list[_Claimed] = []
        dropped: list[str] = []
        for row in rows:
            # Only a new event is dropped: one that was ever attempted was not "lost".
            if row["attempts"] == 0 and simulation.drops():
                dropped.append(row["id"])
            else:
                to_send.append(
                    _Claimed(
                        row["id"],
                        row["body"],
                        row["attempts"],
                        row["correlation_id"],
                        row["next_attempt_at"],
                    )
                )
        if dropped:
            await conn.execute(_DROP_SQL, dropped)
        return to_send, dropped

    return await db.transaction(claim)


async def _gather_attempts(
    db: Database,
    session: aiohttp.ClientSession,
    simulation: Simulation,
    target: WebhookTarget,
    policy: RetryPolicy,
    claimed: list[_Claimed],
) -> list[str]:
    results = await asyncio.gather(
        *(_attempt_in_scope(db, session, simulation, target, policy, d) for d in claimed),
        return_exceptions=True,
    )
    outcomes: list[str] = []
    for delivery, result in zip(claimed, results, strict=True):
        if isinstance(result, BaseException):
            # Most likely the database went away while recording; the claim expires and
            # the delivery is attempted again.
            log.error(
                "webhook attempt not recorded",
                extra={"event_id": delivery.id, "error": repr(result)},
                exc_info=result,
            )
        else:
            outcomes.extend(result)
    return outcomes


async def _attempt_in_scope(
    db: Database,
    session: aiohttp.ClientSession,
    simulation: Simulation,
    target: WebhookTarget,
    policy: RetryPolicy,
    delivery: _Claimed,
) -> list[str]:
    # Log under the correlation id of the request that created the charge.
    with correlation_scope(delivery.correlation_id):
        return await _attempt(db, session, simulation, target, policy, delivery)


async def _attempt(
    db: Database,
    session: aiohttp.ClientSession,
    simulation: Simulation,
    target: WebhookTarget,
    policy: RetryPolicy,
    delivery: _Claimed,
) -> list[str]:
    # A fresh timestamp per attempt, so receivers' replay windows accept retries.
    headers = {
        "Content-Type": "application/json",
        **signature_headers(delivery.body, target.secrets, message_id=delivery.id),
    }
    if delivery.correlation_id:
        headers[CORRELATION_HEADER] = delivery.correlation_id
    status, error = await _send(session, target, delivery.body, headers)
    attempt = delivery.attempts + 1
    if status is not None and 200 <= status < 300:
        await _record(db, _DELIVERED_SQL, delivery.id, status, delivery.claimed_until)
        log.info("webhook delivered", extra={"event_id": delivery.id, "attempt": attempt})
        outcomes = ["delivered"]
        if simulation.duplicates():
            # The identical request, headers included, as a PSP retrying after a lost 2xx would.
            await _send(session, target, delivery.body, headers)
            outcomes.append("duplicated")
        return outcomes

    gives_up = attempt >= policy.max_attempts
    delay = policy.delay(delivery.attempts)
    await _record(
        db,
        _FAILED_SQL,
        delivery.id,
        status,
        error,
        "failed" if gives_up else "pending",
        delay,
        delivery.claimed_until,
    )
    log.warning(
        "webhook delivery failed" if gives_up else "webhook attempt failed, will retry",
        extra={
            "event_id": delivery.id,
            "attempt": attempt,
            "status": status,
            "error": error,
            **({} if gives_up else {"retry_in_s": delay}),
        },
    )
    return ["failed" if gives_up else "retried"]


async def _send(
    session: aiohttp.ClientSession, target: WebhookTarget, body: bytes, headers: dict[str, str]
) -> tuple[int | None, str | None]:
    """POST `body`; return the status (None when no answer came) and what went wrong."""
    try:
        async with session.post(
            target.url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=target.timeout_seconds),
            # A redirect is not an acceptance: the merchant must fix its URL.
            allow_redirects=False,
        ) as response:
            if 200 <= response.status < 300:
                return response.status, None
            detail = await response.content.read(_ERROR_DETAIL_BYTES)
            return response.status, f"HTTP {response.status}: {detail.decode(errors='replace')}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, repr(exc)


async def _record(db: Database, sql: str, *args: object) -> None:
    async def record(conn: Connection) -> str:
        return await conn.execute(sql, *args)

    # One UPDATE: atomic on its own, no BEGIN/COMMIT round trips.
    if await db.statement(record) == "UPDATE 0":
        # The claim expired and another worker took the delivery over: its record wins.
        # (Or a lost COMMIT was retried after it had in fact committed: same outcome.)
        log.warning("webhook attempt outlived its claim", extra={"event_id": args[0]})
