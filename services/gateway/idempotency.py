"""`Idempotency-Key` for `/pay` and refunds, with the semantics of the big PSPs.

- first use of a key: the request runs; its answer is stored for at least 24 h;
- same key, same request: the stored answer again (`Idempotent-Replayed: true`);
- same key, a different request: 422;
- same key while the first request is still running: 409.

The payment's id and reference are fixed when the key is first claimed and stored with
it. If the gateway dies after publishing but before recording the answer, a retry
(after `LOCK_SECONDS`) takes the key over and publishes *the same payment* again, which
the payments service stores once: a client retrying with its key can never pay twice.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from libs.common.db import Connection, Database
from libs.common.errors import ApiError

RETENTION = "24 hours"
# How long a request may hold its key before a retry may presume it dead. Far above the
# publish timeout, so a live request is never taken over.
LOCK_SECONDS = 10
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ApiError(
            400,
            "idempotency_key_invalid",
            "Idempotency-Key must be 1 to 255 visible ASCII characters.",
        )
    return key


@dataclasses.dataclass(frozen=True, slots=True)
class Claimed:
    """This request holds the key; `body` is the answer to give once published."""

    body: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    status: int
    body: dict[str, Any]


class IdempotencyKeys:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim(
        self, scope: str, key: str, fingerprint: str, prepared: dict[str, Any]
    ) -> Claimed | Replay:
        return await self.db.transaction(
            lambda conn: _claim(conn, scope, key, fingerprint, prepared)
        )

    async def complete(self, scope: str, key: str, status: int, body: dict[str, Any]) -> None:
        await self.db.transaction(
            lambda conn: conn.execute(
                """
                UPDATE gateway.idempotency_keys
                   SET state = 'completed', response_status = $3, response_body = $4,
                       locked_until = NULL
                 WHERE scope = $1 AND key = $2
                """,
                scope,
                key,
                status,
                body,
            )
        )

    async def release(self, scope: str, key: str) -> None:
        """The request failed before an answer: let the next retry take over at once."""
        await self.db.transaction(
            lambda conn: conn.execute(
                "UPDATE gateway.idempotency_keys SET locked_until = now()"
                " WHERE scope = $1 AND key = $2 AND state = 'in_flight'",
                scope,
                key,
            )
        )

    async def forget(self, scope: str, key: str) -> None:
        """The request was refused (4xx) before it changed anything: free the key, as if
        never used, so nothing of the refused request stays stored."""
        await self.db.transaction(
            lambda conn: conn.execute(
                "DELETE FROM gateway.idempotency_keys"
                " WHERE scope = $1 AND key = $2 AND state = 'in_flight'",
                scope,
                key,
            )
        )

    async def purge_expired(self, batch: int = 1000) -> int:
        deleted = await self.db.transaction(
            lambda conn: conn.execute(
                """
                DELETE FROM gateway.idempotency_keys
                 WHERE (scope, key) IN (
                     SELECT scope, key FROM gateway.idempotency_keys
                      WHERE expires_at < now() LIMIT $1)
                """,
                batch,
            )
        )
        return int(deleted.split()[-1])


async def _claim(
    conn: Connection, scope: str, key: str, fingerprint: str, prepared: dict[str, Any]
) -> Claimed | Replay:
    inserted = await conn.fetchval(
        f"""
        INSERT INTO gateway.idempotency_keys
            (scope, key, request_hash, state, response_body, expires_at, locked_until)
        VALUES ($1, $2, $3, 'in_flight', $4, now() + interval '{RETENTION}',
                now() + make_interval(secs => $5))
        ON CONFLICT (scope, key) DO NOTHING
        RETURNING true
        """,  # noqa: S608 - RETENTION is a constant
        scope,
        key,
        fingerprint,
        prepared,
        LOCK_SECONDS,
    )
    if inserted:
        return Claimed(prepared)

    row = await conn.fetchrow(
        """
        SELECT request_hash, state, response_status, response_body,
               expires_at < now() AS expired, locked_until < now() AS abandoned
          FROM gateway.idempotency_keys
         WHERE scope = $1 AND key = $2
           FOR UPDATE
        """,
        scope,
        key,
    )
    if row is None:
        # Purged between our insert and select: a new key in all but name.
        return await _claim(conn, scope, key, fingerprint, prepared)
    if row["expired"]:
        await _take_over(conn, scope, key, fingerprint, prepared)
        return Claimed(prepared)
    if row["request_hash"] != fingerprint:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "This Idempotency-Key was used with a different request; use a new key.",
        )
    if row["state"] == "completed":
        return Replay(row["response_status"], row["response_body"])
    if not row["abandoned"]:
        raise ApiError(
            409,
            "idempotency_key_in_flight",
            "A request with this Idempotency-Key is still being processed; retry shortly.",
            headers={"Retry-After": "1"},
        )
    # Its holder died or gave up: carry on with the payment it prepared.
    await _take_over(conn, scope, key, fingerprint, row["response_body"])
    return Claimed(row["response_body"])


async def _take_over(
    conn: Connection, scope: str, key: str, fingerprint: str, body: dict[str, Any]
) -> None:
    await conn.execute(
        f"""
        UPDATE gateway.idempotency_keys
           SET request_hash = $3, state = 'in_flight', response_status = NULL,
               response_body = $4, expires_at = now() + interval '{RETENTION}',
               locked_until = now() + make_interval(secs => $5)
         WHERE scope = $1 AND key = $2
        """,  # noqa: S608 - RETENTION is a constant
        scope,
        key,
        fingerprint,
        body,
        LOCK_SECONDS,
    )
