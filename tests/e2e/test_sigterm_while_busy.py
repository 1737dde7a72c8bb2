"""Each service exits promptly, and cleanly, on SIGTERM in the middle of work.

The whole platform runs under a stream of payments (the gateway takes them, payments
charges them, the provider settles them and delivers webhooks, the webhooks service
applies them) and reconciliation requests; each service gets SIGTERM while that goes on.
A stop that waits on something without a bound (it once did: see
tests/integration/test_consumer_stop.py) would show here as a process still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import pytest

from tests.e2e.stack import Stack
from tests.support import eventually

pytestmark = pytest.mark.e2e

# The stack's SHUTDOWN_TIMEOUT_SECONDS is 5; every step of a stop shares that budget.
EXIT_WITHIN_SECONDS = 10.0
PAYMENT = {"amount": 12.5, "customer_id": "sigterm_customer", "description": "busy"}
# Quick settlement, so that webhooks flow while the services are stopped.
BUSY = {"PROVIDER_WEBHOOK_DELAY_MS": "0", "PROVIDER_DECLINE_RATE": "0.2"}


class Traffic:
    """Payments and reconciliation requests sent without pause, until stopped."""

    def __init__(self, http: aiohttp.ClientSession, gateway_url: str) -> None:
        self.http = http
        self.url = gateway_url
        self.accepted = 0
        self._tasks = [asyncio.create_task(self._pay()) for _ in range(4)]
        self._tasks.append(asyncio.create_task(self._reconcile()))

    async def _pay(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.post(f"{self.url}/api/payments/pay", json=PAYMENT) as r:
                    if r.status == 202:
                        self.accepted += 1
            await asyncio.sleep(0)

    async def _reconcile(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.post(f"{self.url}/api/reconciliations") as response:
                    await response.read()
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _processed(db: Any) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM webhooks.webhook_events WHERE status = 'applied'"
    )
    return count


async def test_every_service_exits_promptly_on_sigterm_while_busy(stack: Stack, db: Any) -> None:
    provider = await stack.start("provider", **BUSY)
    payments = await stack.start("payments")
    webhooks = await stack.start("webhooks")
    reconciler = await stack.start("reconciler", RECONCILE_MIN_AGE_SECONDS="0")
    gateway = await stack.start("gateway", RATE_LIMIT="100000/second")

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        traffic = Traffic(http, gateway.url)
        try:
            # Busy everywhere: webhooks applied means every hop has work in flight.
            await eventually(lambda: _processed(db), within=30)
            # The gateway last: the traffic reaches the others through it.
            for service in (reconciler, payments, webhooks, provider, gateway):
                before = traffic.accepted
                await eventually(lambda before=before: traffic.accepted > before, within=10)
                started = time.monotonic()
                service.terminate()
                code = await service.wait_exit(within=EXIT_WITHIN_SECONDS + 20)
                took = time.monotonic() - started
                assert code == 0, f"{service.name} exited with {code}:\n{service.tail()}"
                assert took < EXIT_WITHIN_SECONDS, f"{service.name} took {took:.1f} s to stop"
                assert "stopped" in service.logs().splitlines()[-1], service.tail()
        finally:
            await traffic.stop()
