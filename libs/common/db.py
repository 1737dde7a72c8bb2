"""The PostgreSQL connection pool and the one way to run a transaction.

Every timeout is finite: connecting, acquiring a pooled connection and each command.
A transaction that fails because the connection went away (PostgreSQL restarted, the
network dropped, a command timed out while the server was stalled) is run again from
the start on a fresh connection, a bounded number of times. Callers therefore pass the
*whole* transaction as a function, and that function must be safe to run twice: when the
connection dies during COMMIT nobody knows whether it committed, so every write the
platform makes is idempotent (inbox rows, conditional updates, ON CONFLICT inserts).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from libs.common.backoff import Backoff
from libs.common.settings import DEFAULT_SHUTDOWN_TIMEOUT_SECONDS, DatabaseSettings
from libs.common.shutdown import bounded

log = logging.getLogger(__name__)

T = TypeVar("T")
# What a transaction function receives: in practice a pooled connection.
# (Strings: asyncpg's classes are generic only in its type stubs.)
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"

# Errors after which the same transaction may succeed on another connection or a moment later.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # includes "connection was closed in the middle of operation"
    asyncpg.CannotConnectNowError,  # server starting up or shutting down
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    ConnectionError,
    TimeoutError,  # command or acquire timeout: a stalled server
    OSError,
)


def is_transient(exc: BaseException, connection_closed: bool = False) -> bool:
    """Whether running the same transaction again, on a fresh connection, may succeed."""
    # Once the connection is gone, whatever asyncpg raised (InterfaceError, an internal
    # protocol error) means the same thing: the work did not complete on this connection.
    return connection_closed or isinstance(exc, _TRANSIENT_ERRORS)


def _is_lost(conn: Connection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        # asyncpg detaches a pooled connection from its proxy once the connection is lost.
        return True


async def _init_connection(conn: Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(conn: Connection) -> None:
    """Nothing to reset: see `Database.connect`."""


# Far above what the default attempts reach: a bound, should someone raise them.
MAX_BACKOFF_SECONDS = 5.0


class _Retryable(Exception):
    def __init__(self, error: Exception) -> None:
        self.error = error


class Database:
    """A pool plus the retry and timeout policy every service uses."""

    def __init__(
        self,
        pool: Pool,
        *,
        acquire_timeout: float,
        attempts: int = 4,
        backoff_seconds: float = 0.1,
    ) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds

    @classmethod
    async def connect(cls, settings: DatabaseSettings, *, session_state: bool = True) -> Database:
        """A pool for `settings`.

        asyncpg resets each connection given back to the pool with a query of its own
        (release advisory locks, close cursors, unlisten, reset settings): one more round
        trip per use. A service whose code leaves no such state on a connection passes
        `session_state=False` (its settings' `db_session_state`) to skip it; an open
        transaction is still rolled back.
        """
        pool = await asyncpg.create_pool(
            settings.database_dsn(),
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            timeout=settings.db_connect_timeout_seconds,
            command_timeout=settings.db_command_timeout_seconds,
            init=_init_connection,
            reset=None if session_state else _keep_session,
        )
        return cls(pool, acquire_timeout=settings.db_acquire_timeout_seconds)

    async def close(self, timeout_seconds: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS) -> None:
        """Close the pool, waiting at most `timeout_seconds` for connections in use to be
        released; then terminate what is left (its transactions roll back)."""
        if not await bounded(self.pool.close(), timeout_seconds, "close database pool"):
            self.pool.terminate()

    async def transaction(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` inside one transaction; retried whole on connection loss."""
        return await self._retrying(work, in_transaction=True)

    async def _retrying(
        self, work: Callable[[Connection], Awaitable[T]], *, in_transaction: bool
    ) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return await self._attempt(work, in_transaction=in_transaction)
            except _Retryable as retryable:
                if attempt == self.attempts:
                    raise retryable.error from None
                backoff = Backoff(self.backoff_seconds, MAX_BACKOFF_SECONDS, jitter=1.0)
                delay = backoff.delay(attempt)
                log.warning(
                    "database transaction failed, retrying",
                    extra={
                        "attempt": attempt,
                        "error": repr(retryable.error),
                        "retry_in_s": round(delay, 3),
                    },
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self, work: Callable[[Connection], Awaitable[T]], *, in_transaction: bool
    ) -> T:
        try:
            conn = await self.pool.acquire(timeout=self.acquire_timeout)
        except Exception as exc:
            if is_transient(exc):
                raise _Retryable(exc) from exc
            raise
        try:
            if not in_transaction:
                return await work(conn)
            async with conn.transaction():
                return await work(conn)
        except Exception as exc:
            if is_transient(exc, _is_lost(conn)):
                raise _Retryable(exc) from exc
            raise
        finally:
            await self._release(conn)

    async def _release(self, conn: PoolConnectionProxy[asyncpg.Record]) -> None:
        """Give `conn` back to the pool, without masking what the work did or raised.

        A connection lost mid-operation cannot be reset: asyncpg then terminates it (a new
        one takes its place) and raises from `release`. Raised from the `finally` above,
        that error would replace the transient one and turn a retry into a failure.
        """
        try:
            await self.pool.release(conn)
        except Exception as exc:  # noqa: BLE001 - asyncpg terminated it; the pool replaces it
            log.warning("database connection discarded", extra={"error": repr(exc)})

    async def statement(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work`, which is one SQL statement, without BEGIN/COMMIT round trips.

        A single statement is atomic on its own; it is retried like a transaction."""
        return await self._retrying(work, in_transaction=False)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self.statement(lambda conn: conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self.statement(lambda conn: conn.fetchrow(query, *args))

    async def ping(self, within_seconds: float = 2.0) -> None:
        """Raise unless the database answers a trivial query within `timeout` (for /ready)."""
        async with asyncio.timeout(within_seconds), self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
