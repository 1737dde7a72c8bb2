"""Refunds and cancels under faults, against every service as a real process.

Refund cases: a few payments are paid and completed first; then clients ask for partial
refunds of them for a few seconds (each with its own Idempotency-Key, retried like the
payment clients of tests/faults/harness.py), starting with 30 at once on one payment;
mid-load the consumer that submits refunds (the payments service) or the webhooks
service is SIGKILLed and started again. Once settled:

- every refund answered 202 is stored; none is left pending;
- the provider's own records hold exactly one refund per refund submitted (under its
  id), and none for a refund that was refused or never stored;
- every refund ended where the provider's did (succeeded / failed), and for each payment
  the provider refunded exactly the sum of its succeeded refunds, never more than the
  payment: its status says so (completed, partially_refunded, refunded);
- the queues are empty, nothing is unacked or parked; every service is ready.

Cancel case: payments are paid and, at once, canceled, retrying while the payment is not
stored yet (404); the payments service is SIGKILLed meanwhile. Each ends exactly one way:
canceled (200) and never charged, or refused (409) and charged once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.processes import running_services
from tests.e2e.stack import Stack
from tests.faults.harness import (
    INSPECTIONS,
    RETRIED_STATUSES,
    Checker,
    FaultRow,
    Load,
    Platform,
    markdown_table,
    record,
)
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ENV = {
    # Every charge succeeds (declines are not under test here), refunds settle fast.
    "PROVIDER_DECLINE_RATE": "0",
    "PROVIDER_WEBHOOK_DELAY_MS": "100",
    "PROVIDER_REFUND_DECLINE_RATE": "0.1",
    "PROVIDER_SEED": "20261201",
}
# Refunds settle later than a killed service takes to come back, so that the messages
# it had not acked come back while their refunds are still pending (and are submitted
# again: the provider's idempotency must make that one refund).
REFUND_CASE_ENV = {"PROVIDER_WEBHOOK_DELAY_MS": "8000", "RECONCILE_MIN_AGE_SECONDS": "2"}
PAYMENTS = 6
PAYMENT_AMOUNT = "20.00"
BURST = 30
REFUNDS_PER_SECOND = 12
LOAD_SECONDS = 6.0
# Mid-burst, while the steady refunds flow too: refunds are in flight when the fault hits.
FAULT_AT_SECONDS = 1.0
DOWN_SECONDS = 1.0
PROVIDER_DELAY_SECONDS = 0.3
REQUEST_DEADLINE_SECONDS = 45.0
SETTLE_SECONDS = 60.0
RECONCILE_EVERY_SECONDS = 5.0


@dataclasses.dataclass
class Asked:
    key: str
    payment_id: str
    amount: str
    refund_id: str | None = None
    refused: str | None = None
    attempts: int = 0


class RefundClients:
    """Clients asking for refunds, each retried with its key until a final answer."""

    def __init__(self, http: aiohttp.ClientSession, gateway_url: str) -> None:
        self.http = http
        self.url = gateway_url
        self.asked: list[Asked] = []
        self.answers: collections.Counter[str] = collections.Counter()
        self._run = uuid.uuid4().hex[:8]

    async def refund(self, payment_id: str, amount: str) -> Asked:
        asked = Asked(f"refund-{self._run}-{len(self.asked)}", payment_id, amount)
        self.asked.append(asked)
        body = json.dumps({"amount": amount, "reason": "fault test"}).encode()
        deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS
        delay = 0.2
        while time.monotonic() < deadline:
            asked.attempts += 1
            try:
                async with self.http.post(
                    f"{self.url}/api/payments/{payment_id}/refunds",
                    data=body,
                    headers={"Content-Type": "application/json", "Idempotency-Key": asked.key},
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as response:
                    self.answers[str(response.status)] += 1
                    answer = await response.json(content_type=None)
                    if response.status == 202:
                        asked.refund_id = answer["id"]
                        return asked
                    # 409 is retried only while the key is in flight: nothing_to_refund is final.
                    in_flight = answer.get("error") == "idempotency_key_in_flight"
                    if response.status not in RETRIED_STATUSES or (
                        response.status == 409 and not in_flight
                    ):
                        asked.refused = f"{response.status} {answer.get('error')}"
                        return asked
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.answers[type(exc).__name__] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        return asked


async def pay(http: aiohttp.ClientSession, url: str, amount: str, customer: str) -> str:
    """One payment, retried with its key until accepted; its id."""
    key = f"{customer}-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"amount": amount, "customer_id": customer}).encode()
    deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        try:
            async with http.post(
                f"{url}/api/payments/pay",
                data=body,
                headers={"Content-Type": "application/json", "Idempotency-Key": key},
            ) as response:
                if response.status == 202:
                    payment_id: str = (await response.json())["id"]
                    return payment_id
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"payment {key} never accepted")


async def completed_payments(
    http: aiohttp.ClientSession, url: str, checker: Checker, n: int
) -> list[str]:
    ids = list(
        await asyncio.gather(*(pay(http, url, PAYMENT_AMOUNT, f"refunded-{i}") for i in range(n)))
    )

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = await checker.fetchval(
            "SELECT count(*) FROM payments.payments WHERE id = ANY($1::uuid[])"
            " AND status = 'completed'",
            ids,
        )
        if done == n:
            return ids
        await asyncio.sleep(0.2)
    raise AssertionError("the payments to refund did not complete")


Inject = Callable[[Platform], Awaitable[None]]


def kill_and_restart(service: str) -> Inject:
    async def inject(platform: Platform) -> None:
        platform.kill(service)  # SIGKILL: nothing more is acked or committed
        await asyncio.sleep(DOWN_SECONDS)
        await platform.restart(service)

    return inject


async def drive_refunds(
    clients: RefundClients, payment_ids: list[str], platform: Platform, inject: Inject
) -> float:
    """The burst, then a steady stream, with the fault mid-way; the fault's length."""
    tasks = [asyncio.create_task(clients.refund(payment_ids[0], "1.00")) for _ in range(BURST)]
    started = time.monotonic()
    fault: asyncio.Task[None] | None = None
    fault_began = 0.0
    n = 0
    rng = random.Random(20261201)
    while time.monotonic() - started < LOAD_SECONDS:
        if fault is None and time.monotonic() - started >= FAULT_AT_SECONDS:
            fault_began = time.monotonic()
            fault = asyncio.create_task(inject(platform))
        payment_id = rng.choice(payment_ids)
        amount = f"{rng.randint(1, 3)}.{rng.choice(['00', '25', '50'])}"
        tasks.append(asyncio.create_task(clients.refund(payment_id, amount)))
        n += 1
        await asyncio.sleep(max(0.0, started + n / REFUNDS_PER_SECOND - time.monotonic()))
    assert fault is not None
    await fault
    lasted = time.monotonic() - fault_began
    await asyncio.gather(*tasks)
    return lasted


async def settle_refunds(checker: Checker, load: Load) -> tuple[bool, int, str]:
    started = time.monotonic()
    ask_at = started + RECONCILE_EVERY_SECONDS
    runs = 0
    state = ""
    while time.monotonic() - started < SETTLE_SECONDS:
        pending = await checker.fetchval(
            "SELECT count(*) FROM payments.refunds WHERE status = 'pending'"
        )
        processing = await checker.fetchval(
            "SELECT count(*) FROM provider.refunds WHERE status = 'processing'"
        )
        queues = await checker.ready_messages()
        state = f"{pending} refunds pending, {processing} processing at the provider, {queues}"
        if pending == 0 and processing == 0 and queues is not None and not any(queues.values()):
            return True, runs, state
        if time.monotonic() >= ask_at:
            if await load.request_reconciliation():
                runs += 1
            ask_at = time.monotonic() + RECONCILE_EVERY_SECONDS
        await asyncio.sleep(0.25)
    return False, runs, state


async def refund_problems(
    checker: Checker, clients: RefundClients, payment_ids: list[str]
) -> tuple[list[str], dict[str, Any]]:
    problems: list[str] = []
    accepted = {a.refund_id for a in clients.asked if a.refund_id}
    refused = collections.Counter(a.refused for a in clients.asked if a.refused)
    unexpected = {
        r: n
        for r, n in refused.items()
        if r and "amount_exceeds_refundable" not in r and "nothing_to_refund" not in r
    }
    if unexpected:
        problems.append(f"refunds refused for another reason: {unexpected}")
    unanswered = [a.key for a in clients.asked if not a.refund_id and not a.refused]
    if unanswered:
        problems.append(f"refund requests never answered: {unanswered[:5]}")
    errors = {
        k: n for k, n in clients.answers.items() if k.isdigit() and int(k) >= 500 and k != "503"
    }
    if errors:
        problems.append(f"server errors other than 503: {errors}")

    stored = {str(r["id"]): r for r in await checker.fetch("SELECT * FROM payments.refunds")}
    lost = sorted(accepted - set(stored))
    if lost:
        problems.append(f"refunds answered 202 but not stored: {lost[:5]}")
    strays = sorted(set(stored) - accepted)
    if strays:
        problems.append(f"refunds stored that no client was answered 202 for: {strays[:5]}")
    pending = [i for i, r in stored.items() if r["status"] == "pending"]
    if pending:
        problems.append(f"refunds left pending: {pending[:5]}")

    at_provider = await checker.fetch(
        "SELECT reference, count(*) AS n, min(status) AS status, min(id) AS id,"
        " sum(amount_minor)::bigint AS amount_minor FROM provider.refunds GROUP BY reference"
    )
    by_reference = {r["reference"]: r for r in at_provider}
    twice = {ref: r["n"] for ref, r in by_reference.items() if r["n"] != 1}
    if twice:
        problems.append(f"refunds the provider holds more than once: {twice}")
    never_submitted = sorted(set(stored) - set(by_reference))
    if never_submitted:
        problems.append(f"refunds the provider never got: {never_submitted[:5]}")
    unknown = sorted(set(by_reference) - set(stored))
    if unknown:
        problems.append(f"provider refunds of no stored refund: {unknown[:5]}")
    disagree = [
        (i, r["status"], by_reference[i]["status"])
        for i, r in stored.items()
        if i in by_reference and r["status"] != by_reference[i]["status"]
    ]
    if disagree:
        problems.append(f"refunds not settled where the provider's did: {disagree[:5]}")

    payments = await checker.fetch(
        """
        SELECT p.id::text AS id, p.status, p.amount_minor,
               coalesce((SELECT sum(r.amount_minor) FROM payments.refunds r
                          WHERE r.payment_id = p.id AND r.status = 'succeeded'), 0)::bigint
                   AS refunded,
               coalesce((SELECT sum(pr.amount_minor) FROM provider.refunds pr
                          WHERE pr.charge_id = p.provider_reference
                            AND pr.status = 'succeeded'), 0)::bigint AS provider_refunded
          FROM payments.payments p WHERE p.id = ANY($1::uuid[])
        """,
        payment_ids,
    )
    for p in payments:
        if p["refunded"] != p["provider_refunded"] or p["refunded"] > p["amount_minor"]:
            problems.append(
                f"payment {p['id']}: refunded {p['refunded']}, provider refunded"
                f" {p['provider_refunded']}, of {p['amount_minor']}"
            )
        expected = (
            "refunded"
            if p["refunded"] == p["amount_minor"]
            else "partially_refunded"
            if p["refunded"]
            else "completed"
        )
        if p["status"] != expected:
            problems.append(f"payment {p['id']} is {p['status']}, its refunds say {expected}")
    burst = clients.asked[:BURST]
    details = {
        "refunds_asked": len(clients.asked),
        "refunds_accepted": len(accepted),
        "refunds_stored": len(stored),
        "refunds_lost": len(lost),
        "provider_refunds": sum(r["n"] for r in at_provider),
        "provider_duplicates": sum(r["n"] - 1 for r in at_provider),
        "refused": dict(refused),
        "succeeded": sum(r["status"] == "succeeded" for r in stored.values()),
        "failed": sum(r["status"] == "failed" for r in stored.values()),
        "burst_accepted": sum(bool(a.refund_id) for a in burst),
        "payments": {p["id"]: (p["status"], p["refunded"], p["amount_minor"]) for p in payments},
        "answers": dict(clients.answers),
    }
    return problems, details


async def run_refund_case(
    fault: str, inject: Inject, *, database_url: str, rabbitmq_url: str, tmp_path: Path
) -> FaultRow:
    checker = Checker(database_url, rabbitmq_url)
    proxy: TcpProxy | None = None
    try:
        with running_services(tmp_path) as services:
            stack = Stack(database_url, rabbitmq_url, tmp_path, services)
            platform = Platform(stack, {**ENV, **REFUND_CASE_ENV})
            # The payments service and the reconciler reach the provider through a proxy
            # that slows its answers during the refunds, so that refunds are in flight
            # (asked of the provider, not yet acked) when the fault hits.
            proxy = TcpProxy("127.0.0.1", platform.stack.provider_port)
            await proxy.start()
            stack.provider_url = f"http://127.0.0.1:{proxy.port}"
            await platform.start_all()
            async with aiohttp.ClientSession() as http:
                load = Load(http, platform.gateway.url, checker)
                payment_ids = await completed_payments(
                    http, platform.gateway.url, checker, PAYMENTS
                )
                clients = RefundClients(http, platform.gateway.url)
                proxy.response_delay_seconds = PROVIDER_DELAY_SECONDS
                lasted = await drive_refunds(clients, payment_ids, platform, inject)
                proxy.response_delay_seconds = 0.0
                settled, runs, state = await settle_refunds(checker, load)
                # What is wrong only for a moment (a late webhook on its way through) is
                # looked at again; what stays wrong is reported.
                for _ in range(INSPECTIONS):
                    problems, details = await refund_problems(checker, clients, payment_ids)
                    queues = await checker.ready_messages()
                    if queues is None or any(queues.values()):
                        problems.append(f"queues not empty: {queues}")
                    unacked = await checker.unacked_messages()
                    if any(unacked.values()):
                        problems.append(f"messages left unacked: {unacked}")
                    if not problems:
                        break
                    await asyncio.sleep(1.0)
                if not settled:
                    problems.append(f"not settled within {SETTLE_SECONDS}s: {state}")
                problems += await platform.check_ready()
    finally:
        await checker.close()
        if proxy is not None:
            await proxy.close()
    row = FaultRow(
        fault=fault,
        requests=details["refunds_asked"],
        answered=details["refunds_accepted"],
        stored=details["refunds_stored"],
        duplicates=details["provider_duplicates"],
        lost=details["refunds_lost"],
        webhooks_answered=0,
        reconcile_runs=runs,
        recovery_seconds=None,
        fault_seconds=lasted,
        passed=not problems,
        details=details,
    )
    record(row)
    print(markdown_table([row]), json.dumps(details, indent=1))  # noqa: T201 - the figures
    assert problems == [], f"{fault} (service logs in {tmp_path}):\n" + "\n".join(problems)
    return row


@pytest.mark.parametrize("service", ["payments", "webhooks"])
async def test_refunds_survive_a_sigkill_mid_load(
    service: str, database_url: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    await run_refund_case(
        f"SIGKILL {service} during refunds",
        kill_and_restart(service),
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        tmp_path=tmp_path,
    )


# --- cancel racing the charge -------------------------------------------------------------------

CANCEL_RACES = 40


async def pay_and_cancel(http: aiohttp.ClientSession, url: str, i: int) -> tuple[str, int]:
    """Pay, then cancel at once (retrying while the payment is not stored yet)."""
    payment_id = await pay(http, url, "5.00", f"race-{i}")
    deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        try:
            async with http.post(f"{url}/api/payments/{payment_id}/cancel") as response:
                if response.status in (200, 409):
                    return payment_id, response.status
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.01)
    raise AssertionError(f"the cancel of {payment_id} never got an answer")


async def test_a_cancel_racing_the_charge_ends_one_way(
    database_url: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    checker = Checker(database_url, rabbitmq_url)
    problems: list[str] = []
    try:
        with running_services(tmp_path) as services:
            stack = Stack(database_url, rabbitmq_url, tmp_path, services)
            platform = Platform(stack, ENV)
            await platform.start_all()
            async with aiohttp.ClientSession() as http:
                url = platform.gateway.url
                races = [
                    asyncio.create_task(pay_and_cancel(http, url, i)) for i in range(CANCEL_RACES)
                ]
                await asyncio.sleep(0.3)
                await kill_and_restart("payments")(platform)
                outcomes = await asyncio.gather(*races)
                load = Load(http, url, checker)
                deadline = time.monotonic() + SETTLE_SECONDS
                ask_at = time.monotonic() + RECONCILE_EVERY_SECONDS
                ids = [p for p, _ in outcomes]
                while time.monotonic() < deadline:
                    left = await checker.fetchval(
                        "SELECT count(*) FROM payments.payments WHERE id = ANY($1::uuid[])"
                        " AND status IN ('pending', 'processing')",
                        ids,
                    )
                    if left == 0:
                        break
                    if time.monotonic() >= ask_at:
                        await load.request_reconciliation()
                        ask_at = time.monotonic() + RECONCILE_EVERY_SECONDS
                    await asyncio.sleep(0.25)
                rows = {
                    r["id"]: r
                    for r in await checker.fetch(
                        "SELECT p.id::text AS id, p.status,"
                        " (SELECT count(*) FROM provider.charges c WHERE c.payment_id = p.id)"
                        "   AS charges"
                        " FROM payments.payments p WHERE p.id = ANY($1::uuid[])",
                        ids,
                    )
                }
                for payment_id, answer in outcomes:
                    row = rows[payment_id]
                    if answer == 200 and (row["status"], row["charges"]) != ("canceled", 0):
                        problems.append(f"{payment_id}: canceled, yet {tuple(row)}")
                    if answer == 409 and (row["status"] == "canceled" or row["charges"] != 1):
                        problems.append(f"{payment_id}: cancel refused, yet {tuple(row)}")
                problems += await platform.check_ready()
    finally:
        await checker.close()
    counts = collections.Counter(answer for _, answer in outcomes)
    row = FaultRow(
        fault="cancel racing the charge, SIGKILL payments",
        requests=CANCEL_RACES,
        answered=counts[200] + counts[409],
        stored=len(rows),
        duplicates=0,
        lost=CANCEL_RACES - len(rows),
        webhooks_answered=0,
        reconcile_runs=0,
        recovery_seconds=None,
        passed=not problems,
        details={"canceled": counts[200], "refused": counts[409]},
    )
    record(row)
    print(markdown_table([row]), row.details)  # noqa: T201 - the figures
    assert problems == [], "\n".join(problems)
    assert len(rows) == CANCEL_RACES
