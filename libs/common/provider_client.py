"""HTTP client for the payment provider's API (the simulated PSP here, a real one later).

Every call has a timeout. Calls that may not have reached the provider (network errors,
timeouts, 5xx) are retried a bounded number of times with backoff; that is safe because
charges are created under an idempotency key (the payment id), so the provider never
charges one payment twice however often we ask.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import aiohttp
from pydantic import BaseModel, ConfigDict, ValidationError

from libs.common.backoff import Backoff
from libs.common.logs import CORRELATION_HEADER, get_correlation_id

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

PROVIDER_NAME = "simulated"
# Far above what the default attempts reach: a bound, should someone raise them.
MAX_BACKOFF_SECONDS = 5.0


class Charge(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    payment_id: uuid.UUID
    reference: str
    amount_minor: int
    currency: str
    customer_id: str
    status: Literal["processing", "succeeded", "declined"]
    decline_reason: str | None = None
    created_at: dt.datetime
    settled_at: dt.datetime | None = None


class ChargeList(BaseModel):
    data: list[Charge]


class ProviderRefund(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    charge_id: str
    # The merchant's refund id.
    reference: str
    amount_minor: int
    currency: str
    status: Literal["processing", "succeeded", "failed"]
    failure_reason: str | None = None
    created_at: dt.datetime
    settled_at: dt.datetime | None = None


class RefundList(BaseModel):
    data: list[ProviderRefund]


class ProviderUnavailable(Exception):
    """The provider could not be reached or kept failing; the outcome is unknown."""


class ProviderRejected(Exception):
    """The provider answered that the request itself is wrong; asking again cannot help."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"provider refused the request ({status}): {body[:500]}")
        self.status = status


class ProviderClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        timeout_seconds: float,
        attempts: int = 3,
        backoff_seconds: float = 0.2,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._attempts = attempts
        self._backoff_seconds = backoff_seconds

    async def create_charge(
        self,
        *,
        payment_id: uuid.UUID,
        reference: str,
        amount_minor: int,
        currency: str,
        customer_id: str,
    ) -> Charge:
        body = {
            "payment_id": str(payment_id),
            "reference": reference,
            "amount_minor": amount_minor,
            "currency": currency,
            "customer_id": customer_id,
        }
        headers = {"Idempotency-Key": str(payment_id)}

        async def attempt() -> Charge:
            return _parse(Charge, await self._send("POST", "/charges", json=body, headers=headers))

        return await self._retrying(attempt)

    async def find_charges(self, payment_id: uuid.UUID) -> list[Charge]:
        async def attempt() -> list[Charge]:
            params = {"payment_id": str(payment_id)}
            return _parse(ChargeList, await self._send("GET", "/charges", params=params)).data

        return await self._retrying(attempt)

    async def create_refund(
        self, *, refund_id: uuid.UUID, charge_id: str, amount_minor: int, currency: str
    ) -> ProviderRefund:
        """Ask for a refund of `charge_id`, under the refund's id as idempotency key, so
        asking again (a redelivery, the reconciler) never refunds twice."""
        body = {
            "charge_id": charge_id,
            "reference": str(refund_id),
            "amount_minor": amount_minor,
            "currency": currency,
        }
        headers = {"Idempotency-Key": str(refund_id)}

        async def attempt() -> ProviderRefund:
            text = await self._send("POST", "/refunds", json=body, headers=headers)
            return _parse(ProviderRefund, text)

        return await self._retrying(attempt)

    async def find_refunds(self, refund_id: uuid.UUID) -> list[ProviderRefund]:
        """The provider's refunds made under our refund id (none, or one)."""

        async def attempt() -> list[ProviderRefund]:
            params = {"reference": str(refund_id)}
            return _parse(RefundList, await self._send("GET", "/refunds", params=params)).data

        return await self._retrying(attempt)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        for number in range(1, self._attempts + 1):
            try:
                return await attempt()
            except ProviderUnavailable as exc:
                if number == self._attempts:
                    raise
                delay = Backoff(self._backoff_seconds, MAX_BACKOFF_SECONDS).delay(number)
                log.warning(
                    "provider call failed, retrying",
                    extra={"attempt": number, "error": str(exc), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, method: str, path: str, **kwargs: Any) -> str:
        """The body of a successful answer."""
        correlation_id = get_correlation_id()
        if correlation_id:
            # The provider logs under the same id, so one payment's story reads across services.
            kwargs["headers"] = {**kwargs.get("headers", {}), CORRELATION_HEADER: correlation_id}
        try:
            async with self._session.request(
                method, self._base_url + path, timeout=self._timeout, **kwargs
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(f"{method} {path}: {exc!r}") from exc
        if status >= 500 or status == 429:
            raise ProviderUnavailable(f"{method} {path}: HTTP {status}")
        if status >= 400:
            raise ProviderRejected(status, text)
        return text


def _parse(model: type[M], text: str) -> M:
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        # A garbled 2xx leaves the outcome unknown, like a timeout: ask again.
        raise ProviderUnavailable(f"unexpected answer from the provider: {exc}") from exc
