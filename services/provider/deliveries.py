"""Webhook delivery: send each queued event until the merchant accepts it, or give up.

A delivery is claimed in a short transaction that pushes its next_attempt_at past the
longest an attempt can take, so no other worker (or replica) sees it as due while it is
being sent, and no transaction stays open across the HTTP call. A batch is sent at once,
then its outcomes are recorded in one statement, each only while its claim is still ours
(next_attempt_at unchanged), so a worker that was presumed dead can never overwrite what
its successor recorded. A worker that dies mid-attempt leaves the claim to expire, and
the delivery is simply tried again: webhooks are at-least-once, and merchants
deduplicate on the event id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence

import aiohttp

from libs.common.backoff import Backoff
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
        return Backoff(self.base_seconds, self.cap_seconds).delay(failed_before + 1)


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
          coalesce(
              (SELECT r.correlation_id FROM provider.refunds r WHERE r.id = d.refund_id),
              (SELECT c.correlation_id FROM provider.charges c WHERE c.id = d.charge_id)
          ) AS correlation_id
"""

_DROP_SQL = """
UPDATE provider.webhook_deliveries
   SET state = 'dropped', last_error = 'dropped by the simulation (PROVIDER_WEBHOOK_DROP_RATE)'
 WHERE id = ANY($1::text[])
"""

# Every outcome of a batch in one statement. Each is written only while the claim is
# still ours (next_attempt_at unchanged); a delivery missing from RETURNING outlived it.
_RECORD_SQL = """
UPDATE provider.webhook_deliveries AS d
   SET state = o.state, attempts = d.attempts + 1, last_status = o.status,
       last_error = o.error,
       delivered_at = CASE WHEN o.state = 'delivered' THEN now() ELSE d.delivered_at END,
       next_attempt_at = CASE
           WHEN o.state = 'delivered' THEN d.next_attempt_at
           ELSE now() + make_interval(secs => o.retry_in)
       END
  FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::double precision[],
              $6::timestamptz[]) AS o(id, state, status, error, retry_in, claimed_until)
 WHERE d.id = o.id AND d.state = 'pending' AND d.next_attempt_at = o.claimed_until
RETURNING d.id
"""


@dataclasses.dataclass(frozen=True, slots=True)
class _Attempt:
    delivery: _Claimed
    headers: dict[str, str]
    status: int | None
    error: str | None
    state: str  # delivered, pending (to retry) or failed (given up)
    retry_in: float

    @property
    def delivered(self) -> bool:
        return self.state == "delivered"


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
    """Send every claimed delivery at once, then record all outcomes in one statement."""
    results = await asyncio.gather(
        *(_send_one(session, target, policy, d) for d in claimed), return_exceptions=True
    )
    attempts: list[_Attempt] = []
    for delivery, result in zip(claimed, results, strict=True):
        if isinstance(result, BaseException):
            # Only this delivery waits for its claim to expire; the others are recorded.
            log.error(
                "webhook attempt failed unexpectedly",
                extra={"event_id": delivery.id, "error": repr(result)},
                exc_info=result,
            )
        else:
            attempts.append(result)
    try:
        recorded = await _record(db, attempts) if attempts else set()
    except Exception as exc:
        # Most likely the database went away; the claims expire and every delivery of
        # the batch is attempted again.
        log.exception(
            "webhook attempts not recorded",
            extra={"event_ids": [a.delivery.id for a in attempts], "error": repr(exc)},
        )
        return []
    outcomes: list[str] = []
    for attempt in attempts:
        with correlation_scope(attempt.delivery.correlation_id):
            if attempt.delivery.id not in recorded:
                # The claim expired and another worker took the delivery over: its record
                # wins. (Or a lost COMMIT was retried after it had in fact committed.)
                log.warning(
                    "webhook attempt outlived its claim", extra={"event_id": attempt.delivery.id}
                )
                continue
            outcomes.append(_log_outcome(attempt))
    duplicates = [
        a for a in attempts if a.delivered and a.delivery.id in recorded and simulation.duplicates()
    ]
    # The identical request, headers included, as a PSP retrying after a lost 2xx would.
    await asyncio.gather(*(_send(session, target, a.delivery.body, a.headers) for a in duplicates))
    return outcomes + ["duplicated"] * len(duplicates)


async def _send_one(
    session: aiohttp.ClientSession, target: WebhookTarget, policy: RetryPolicy, delivery: _Claimed
) -> _Attempt:
    # A fresh timestamp per attempt, so receivers' replay windows accept retries.
    headers = {
        "Content-Type": "application/json",
        **signature_headers(delivery.body, target.secrets, message_id=delivery.id),
    }
    if delivery.correlation_id:
        headers[CORRELATION_HEADER] = delivery.correlation_id
    status, error = await _send(session, target, delivery.body, headers)
    if status is not None and 200 <= status < 300:
        state = "delivered"
    else:
        state = "failed" if delivery.attempts + 1 >= policy.max_attempts else "pending"
    return _Attempt(delivery, headers, status, error, state, policy.delay(delivery.attempts))


async def _record(db: Database, attempts: Sequence[_Attempt]) -> set[str]:
    """Write the outcomes; return the ids whose claim was still ours."""

    async def record(conn: Connection) -> set[str]:
        rows = await conn.fetch(
            _RECORD_SQL,
            [a.delivery.id for a in attempts],
            [a.state for a in attempts],
            [a.status for a in attempts],
            [a.error for a in attempts],
            [a.retry_in for a in attempts],
            [a.delivery.claimed_until for a in attempts],
        )
        return {row["id"] for row in rows}

    # One UPDATE: atomic on its own, no BEGIN/COMMIT round trips.
    return await db.statement(record)


def _log_outcome(attempt: _Attempt) -> str:
    number = attempt.delivery.attempts + 1
    if attempt.delivered:
        log.info("webhook delivered", extra={"event_id": attempt.delivery.id, "attempt": number})
        return "delivered"
    gives_up = attempt.state == "failed"
    log.warning(
        "webhook delivery failed" if gives_up else "webhook attempt failed, will retry",
        extra={
            "event_id": attempt.delivery.id,
            "attempt": number,
            "status": attempt.status,
            "error": attempt.error,
            **({} if gives_up else {"retry_in_s": attempt.retry_in}),
        },
    )
    return "failed" if gives_up else "retried"


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
