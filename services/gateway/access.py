"""Who may call the API, and how often.

API keys: when API_KEYS (or the seed's API_SECRET) is set, and always in production,
`/api/payments*`, `/api/refunds*`, `/api/reconciliations*` and `/api/events*` need
`Authorization: Bearer <key>`. Every configured key is compared in constant time, all of
them on every request, so timing reveals neither a key nor which key matched. A key's
identity for idempotency and rate limits is a hash of it, never the key itself. Removing
a key from API_KEYS revokes it.

Rate limits: a sliding window per client (the API key, or the address without keys)
answers 429 with Retry-After; and a separate window per address counts webhook
signature failures, so a caller probing for a secret is shut out for a while. The window
is limits' sliding window counter: this window's count plus the previous window's,
weighted by how much of it still overlaps, so a burst across a window boundary is not let
through twice. It approximates a moving window with two counters per client instead of a
timestamp per request, whose upkeep cost up to 10% of the gateway's CPU.
Limits are per gateway process; behind N replicas the effective limit is N times this.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Sequence

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from libs.common.errors import ApiError

PROTECTED_PREFIXES = ("/api/payments", "/api/reconciliations", "/api/events", "/api/refunds")
ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeys:
    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [(key.encode(), key_id(key)) for key in keys]

    def identify(self, authorization: str | None) -> str:
        """The caller's identity, or ApiError(401). Without keys configured: anonymous."""
        if not self._keys:
            return ANONYMOUS
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(
                401,
                "api_key_missing",
                "Send your API key as Authorization: Bearer <key>.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        candidate = presented.strip().encode()
        matched = None
        for key, identity in self._keys:
            if hmac.compare_digest(candidate, key):
                matched = identity
        if matched is None:
            raise ApiError(
                401,
                "api_key_invalid",
                "This API key is not valid (or was revoked).",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return matched


class RateLimits:
    def __init__(self, requests: str, webhook_failures: str) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._requests = parse_many(requests)
        self._webhook_failures = parse_many(webhook_failures)

    async def admit(self, client: str) -> None:
        """Count one request by `client`; ApiError(429) past the limit."""
        await self._check(self._requests, client, "rate_limited", hit=True)

    async def admit_webhook(self, address: str) -> None:
        """Refuse an address that failed signature checks too often lately."""
        await self._check(self._webhook_failures, address, "too_many_signature_failures", hit=False)

    async def signature_failed(self, address: str) -> None:
        for item in self._webhook_failures:
            await self._limiter.hit(item, "webhook-failures", address)

    async def _check(
        self, items: list[RateLimitItem], identity: str, code: str, *, hit: bool
    ) -> None:
        namespace = "requests" if hit else "webhook-failures"
        for item in items:
            allowed = (
                await self._limiter.hit(item, namespace, identity)
                if hit
                else await self._limiter.test(item, namespace, identity)
            )
            if not allowed:
                stats = await self._limiter.get_window_stats(item, namespace, identity)
                retry_after = max(1, math.ceil(stats.reset_time - time.time()))
                raise ApiError(
                    429,
                    code,
                    f"Too many requests: the limit is {item}. Retry in {retry_after} s.",
                    headers={"Retry-After": str(retry_after)},
                )
