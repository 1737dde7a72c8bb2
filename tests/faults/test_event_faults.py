"""Events out under faults: the relay's service killed, RabbitMQ restarted, PostgreSQL
restarted, all under the fault suite's load.

A subscriber's durable queue, bound to `payment.#` as README shows, is declared before
the platform starts and read only once everything settled. Then, besides every invariant
the harness checks: the outbox drained to zero; every applied transition has exactly one
event, numbered 1, 2, ... per payment in the order the transitions were applied; every
one of them reached the subscriber at least once, each copy the same message (the same
`message_id`, the same bytes); and a consumer that orders by sequence never sees one out
of sequence: one payment's events first arrive in increasing sequence.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from libs.common.messages import PaymentEvent, PaymentRequested, decode
from tests.e2e.processes import running_services
from tests.e2e.stack import Stack
from tests.faults.harness import (
    FAULT_AT_SECONDS,
    TOPOLOGY,
    Checker,
    FaultContext,
    Inject,
    Load,
    Platform,
    check_invariants,
    clients_saw_503,
    ensure_postgres_running,
    ensure_rabbitmq_running,
    record,
    restart_postgres,
    restart_rabbitmq,
    services_saw_database_errors,
)
from tests.support import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(170)]

SUBSCRIBER_QUEUE = "faults.payment-events"
RELAY_DOWN_SECONDS = 1.5
DRAIN_WITHIN_SECONDS = 30.0


class Subscriber:
    """A durable quorum queue bound to payment.#, read once at the end."""

    def __init__(self, rabbitmq_url: str) -> None:
        self.url = rabbitmq_url

    async def bind(self) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            # The services declare it the same way when they start.
            exchange = await channel.declare_exchange(
                TOPOLOGY.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(
                SUBSCRIBER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(exchange, routing_key="payment.#")

    async def drain(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(SUBSCRIBER_QUEUE)
            taken = []
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                taken.append(message)
            return taken


async def check_events(checker: Checker, subscriber: Subscriber, ctx: FaultContext) -> list[str]:
    problems: list[str] = []

    async def unsent() -> int:
        return int(
            await checker.fetchval(
                "SELECT count(*) FROM payments.outbox WHERE published_at IS NULL"
            )
        )

    async def drained() -> bool:
        return await unsent() == 0

    try:
        await eventually(drained, within=DRAIN_WITHIN_SECONDS, interval=0.25)
    except AssertionError:
        problems.append(f"the outbox did not drain: {await unsent()} events unsent")

    written = await checker.fetch(
        "SELECT payment_id::text AS payment_id, sequence, type, event_id::text AS event_id"
        " FROM payments.outbox ORDER BY id"
    )
    applied = await checker.fetch(
        "SELECT payment_id::text AS payment_id, 'payment.' || to_status AS type"
        " FROM payments.payment_events WHERE applied ORDER BY id"
    )
    expected: dict[str, list[str]] = collections.defaultdict(list)
    for row in applied:
        expected[row["payment_id"]].append(row["type"])
    in_outbox: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for row in written:
        in_outbox[row["payment_id"]].append((row["sequence"], row["type"]))
    misnumbered = {
        payment: events
        for payment, events in in_outbox.items()
        if [seq for seq, _ in events] != list(range(1, len(events) + 1))
    }
    if misnumbered:
        problems.append(f"events not numbered 1, 2, ... in order: {list(misnumbered.items())[:3]}")
    wrong = {
        payment: (types, [t for _, t in in_outbox.get(payment, [])])
        for payment, types in expected.items()
        if [t for _, t in in_outbox.get(payment, [])] != types
    }
    if wrong or set(in_outbox) - set(expected):
        problems.append(
            f"events not one per applied transition: {list(wrong.items())[:3]},"
            f" events of payments with no transition: {sorted(set(in_outbox) - set(expected))[:3]}"
        )

    messages = await subscriber.drain()
    event_ids = {(r["payment_id"], r["sequence"]): r["event_id"] for r in written}
    seen: dict[tuple[str, int], set[tuple[str, bytes]]] = collections.defaultdict(set)
    first_arrivals: dict[str, list[int]] = collections.defaultdict(list)
    copies = 0
    for message in messages:
        if message.type == PaymentRequested.TYPE:
            continue  # payment.# also matches the command
        event = decode(message.body, PaymentEvent)
        key = (str(event.payload.payment_id), event.payload.sequence)
        if key in seen:
            copies += 1
        else:
            first_arrivals[key[0]].append(key[1])
        seen[key].add((str(event.message_id), message.body))
    never = sorted(set(event_ids) - set(seen))
    unknown = sorted(set(seen) - set(event_ids))
    if never or unknown:
        problems.append(
            f"{len(never)} events written and never published: {never[:3]};"
            f" {len(unknown)} published and never written: {unknown[:3]}"
        )
    different = {
        k: v for k, v in seen.items() if len(v) > 1 or next(iter(v))[0] != event_ids.get(k)
    }
    if different:
        problems.append(f"copies of one event that differ: {list(different)[:3]}")
    out_of_sequence = {p: s for p, s in first_arrivals.items() if s != sorted(s)}
    if out_of_sequence:
        problems.append(
            f"events first arrived out of sequence: {list(out_of_sequence.items())[:3]}"
        )
    ctx.details.update(
        events_written=len(written),
        events_received=len(seen),
        event_copies_received=copies,
    )
    return problems


async def run_event_case(
    fault: str,
    inject: Inject,
    *,
    database_url: str,
    rabbitmq_url: str,
    tmp_path: Path,
    observed: Callable[[FaultContext], str | None] | None = None,
) -> None:
    """The harness's case (load, fault, settle, invariants) plus the events' checks."""
    checker = Checker(database_url, rabbitmq_url)
    subscriber = Subscriber(rabbitmq_url)
    await subscriber.bind()
    try:
        with running_services(tmp_path) as services:
            platform = Platform(Stack(database_url, rabbitmq_url, tmp_path, services), {})
            await platform.start_all()
            async with aiohttp.ClientSession() as http:
                load = Load(http, platform.gateway.url, checker)
                ctx = FaultContext(platform, load)
                load.start()
                await asyncio.sleep(FAULT_AT_SECONDS)
                ctx.began()
                await inject(ctx)
                if ctx.fault_ended_at is None:
                    ctx.ended()
                await load.finish()
                if observed is not None and (unseen := observed(ctx)):
                    ctx.notes.append(f"the fault was not observed: {unseen}")
                row, problems = await check_invariants(fault, platform, checker, load, ctx)
                # While the relay still runs: the outbox must drain by itself.
                problems += await check_events(checker, subscriber, ctx)
                row.details.update(ctx.details)
                row.passed = not problems
    finally:
        await checker.close()
    record(row)
    assert problems == [], f"{fault} (service logs in {tmp_path}):\n" + "\n".join(problems)


@pytest.fixture
def servers_restored() -> Any:
    yield
    ensure_postgres_running()
    ensure_rabbitmq_running()


async def test_relay_killed_under_load(
    database_url: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    """The relay runs in the payments service: SIGKILL it mid-load, start it again."""
    backlog_sql = "SELECT count(*) FROM payments.outbox WHERE published_at IS NULL"

    async def inject(ctx: FaultContext) -> None:
        ctx.details["outbox_unsent_at_kill"] = await ctx.load.checker.fetchval(backlog_sql)
        ctx.platform.kill("payments")
        await asyncio.sleep(RELAY_DOWN_SECONDS)
        # Transitions go on meanwhile (webhooks, reconciler): their events wait.
        ctx.details["outbox_unsent_before_restart"] = await ctx.load.checker.fetchval(backlog_sql)
        ctx.ended()
        await ctx.platform.restart("payments")

    def observed(ctx: FaultContext) -> str | None:
        waiting = ctx.details.get("outbox_unsent_before_restart") or 0
        return None if waiting else "no event waited in the outbox while the relay was down"

    await run_event_case(
        "SIGKILL payments (the relay)",
        inject,
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        tmp_path=tmp_path,
        observed=observed,
    )


async def test_rabbitmq_restarted_under_event_load(
    database_url: str, rabbitmq_url: str, tmp_path: Path, servers_restored: None
) -> None:
    async def inject(ctx: FaultContext) -> None:
        started = time.monotonic()
        await restart_rabbitmq()
        ctx.details["rabbitmq_down_seconds"] = round(time.monotonic() - started, 1)
        ctx.ended()

    await run_event_case(
        "RabbitMQ restarted (events)",
        inject,
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        tmp_path=tmp_path,
        observed=clients_saw_503,
    )


async def test_postgres_restarted_under_event_load(
    database_url: str, rabbitmq_url: str, tmp_path: Path, servers_restored: None
) -> None:
    async def inject(ctx: FaultContext) -> None:
        await restart_postgres()
        ctx.ended()

    await run_event_case(
        "PostgreSQL restarted (events)",
        inject,
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        tmp_path=tmp_path,
        observed=services_saw_database_errors,
    )
