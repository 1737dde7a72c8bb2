"""The gateway's HTTP API, called with aiohttp within bounded time.

Every call either returns the decoded JSON answer or raises: `Refused` for a 4xx/5xx
answer (with the API's error code and message), `Unreachable` when the gateway cannot
be reached or does not answer within the timeout.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
from yarl import URL

from tools.paymentsctl.errors import Refused, Unreachable, Usage

DEFAULT_TIMEOUT_SECONDS = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]


def base_url(raw: str) -> URL:
    url = URL(raw.rstrip("/"))
    if url.scheme not in ("http", "https") or not url.host:
        raise Usage(f"the gateway URL must be http(s)://host[:port], not {raw!r}")
    return url


class Gateway:
    """One HTTP session to the gateway; use as `async with Gateway(...) as gateway`."""

    def __init__(
        self, url: str, *, api_key: str | None, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self.url = base_url(url)
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "paymentsctl", **self._headers},
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Reply:
        if self._session is None:
            raise RuntimeError("use the Gateway as an async context manager")
        url = self.url.with_path(self.url.path.rstrip("/") + path)
        where = f"{method} {url.with_query(None)}"
        try:
            async with self._session.request(
                method,
                url,
                json=json_body,
                data=data,
                headers=dict(headers or {}),
                params=dict(params or {}),
            ) as response:
                text = await response.text(errors="replace")
                reply = Reply(response.status, _decode(text), response.headers.copy())
        except TimeoutError:
            raise Unreachable(f"{where}: no answer within {self.timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(
                f"cannot connect to the gateway at {self.url} ({exc.os_error.strerror or exc})"
            ) from None
        except aiohttp.ClientError as exc:
            raise Unreachable(f"{where}: {type(exc).__name__}: {exc}") from None
        if reply.status >= 400:
            raise _refusal(reply)
        if reply.body is None:
            raise Refused(reply.status, "invalid_response", f"{where} did not answer with JSON")
        return reply

    # --- the API's operations -------------------------------------------------------------------

    async def pay(self, order: dict[str, Any], idempotency_key: str | None) -> Reply:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        return await self.request("POST", "/api/payments/pay", json_body=order, headers=headers)

    async def payment(self, payment_id: str) -> Any:
        return (await self.request("GET", f"/api/payments/{_segment(payment_id)}")).body

    async def payments(self, query: Mapping[str, str]) -> Any:
        return (await self.request("GET", "/api/payments", params=query)).body

    async def refund(
        self, payment_id: str, body: dict[str, Any], idempotency_key: str | None
    ) -> Reply:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        path = f"/api/payments/{_segment(payment_id)}/refunds"
        return await self.request("POST", path, json_body=body, headers=headers)

    async def refunds(self, payment_id: str) -> Any:
        return (await self.request("GET", f"/api/payments/{_segment(payment_id)}/refunds")).body

    async def refund_by_id(self, refund_id: str) -> Any:
        return (await self.request("GET", f"/api/refunds/{_segment(refund_id)}")).body

    async def cancel(self, payment_id: str) -> Any:
        path = f"/api/payments/{_segment(payment_id)}/cancel"
        return (await self.request("POST", path)).body

    async def stats(self) -> Any:
        return (await self.request("GET", "/api/payments/stats")).body

    async def send_webhook(self, body: bytes, headers: Mapping[str, str]) -> Any:
        headers = {"Content-Type": "application/json", **headers}
        return (await self.request("POST", "/api/webhooks", data=body, headers=headers)).body

    async def events(self, query: Mapping[str, str]) -> Any:
        return (await self.request("GET", "/api/events", params=query)).body

    async def start_run(self) -> Any:
        return (await self.request("POST", "/api/reconciliations")).body

    async def run(self, run_id: str) -> Any:
        return (await self.request("GET", f"/api/reconciliations/{_segment(run_id)}")).body


def _segment(value: str) -> str:
    """An id as one path segment: a UUID, or another route (`stats`) would answer."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise Usage(f"{value!r} is not an id: ids are UUIDs, as the API returns them") from None


def _decode(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _refusal(reply: Reply) -> Refused:
    body = reply.body if isinstance(reply.body, dict) else {}
    code = body.get("error")
    message = body.get("message")
    details = body.get("details")
    return Refused(
        reply.status,
        code if isinstance(code, str) else f"http_{reply.status}",
        message if isinstance(message, str) else "the gateway answered without an error body",
        details=[d for d in details if isinstance(d, dict)] if isinstance(details, list) else None,
        retry_after=reply.headers.get("Retry-After"),
    )
