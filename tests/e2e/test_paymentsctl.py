"""paymentsctl against running services: every command as a real subprocess.

The CLI runs as the installed console script, from a directory outside the repository,
with only the environment an operator would set (PAYMENTS_URL, RABBITMQ_URL).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from libs.common.broker.publisher import to_amqp
from libs.common.broker.topology import Topology
from libs.common.messages import PaymentRequested, wrap
from tests.e2e.stack import Stack
from tests.support import eventually, free_port

pytestmark = pytest.mark.e2e

PAYMENTSCTL = Path(sys.executable).parent / "paymentsctl"
# Charges settle much later: the CLI's own webhook is what completes the payment.
SLOW_SETTLEMENT = {"PROVIDER_WEBHOOK_DELAY_MS": "600000", "PROVIDER_DECLINE_RATE": "0"}
# Runs happen only when asked for.
ON_DEMAND = {"RECONCILE_CRON": "0 0 1 1 *", "RECONCILE_MIN_AGE_SECONDS": "0"}
# Variables of the outer environment that would point the CLI elsewhere.
CTL_VARIABLES = ("PAYMENTS_URL", "PAYMENTS_API_KEY", "RABBITMQ_URL", "WEBHOOK_SECRET")


@dataclasses.dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclasses.dataclass
class Ctl:
    """Runs `paymentsctl` the way an operator does."""

    env: dict[str, str]
    cwd: Path

    async def __call__(self, *args: str) -> Result:
        process = await asyncio.create_subprocess_exec(
            str(PAYMENTSCTL),
            *args,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())

    async def ok(self, *args: str) -> Result:
        result = await self(*args)
        assert result.code == 0, f"paymentsctl {' '.join(args)}: {result}"
        return result


def operator_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CTL_VARIABLES}
    return {**env, **variables}


@pytest.fixture
def ctl(stack: Stack, tmp_path: Path) -> Ctl:
    workdir = tmp_path / "operator"
    workdir.mkdir()
    return Ctl(
        operator_env(
            PAYMENTS_URL=f"http://127.0.0.1:{stack.gateway_port}",
            RABBITMQ_URL=stack.rabbitmq_url,
        ),
        workdir,
    )


async def test_payments_webhooks_and_reconciliation_through_the_cli(stack: Stack, ctl: Ctl) -> None:
    await stack.start("provider", **SLOW_SETTLEMENT)
    await stack.start("payments")
    await stack.start("webhooks")
    await stack.start("reconciler", **ON_DEMAND)
    await stack.start("gateway")

    order = (
        *("pay", "--amount", "100.00", "--customer", "test_customer"),
        *("--description", "Test payment from DevOps", "--idempotency-key", "order-1042"),
        *("--metadata", "order=1042", "channel=cli"),
    )
    first = (await ctl.ok("--json", *order)).json()
    assert first["status"] == "pending"
    assert first["amount"] == "100.00"
    assert first["metadata"] == {"order": "1042", "channel": "cli"}
    again = await ctl.ok(*order)
    assert first["id"] in again.stdout
    assert "replayed" in again.stdout
    payment_id, reference = first["id"], first["reference"]

    async def status() -> str | None:
        result = await ctl("payments", "get", payment_id, "--json")
        return result.json()["status"] if result.code == 0 else None

    await eventually(lambda: _is(status, "processing"), within=15, interval=0.2)
    shown = await ctl.ok("payments", "get", payment_id)
    assert reference in shown.stdout
    assert "events:" in shown.stdout
    assert "processing" in shown.stdout

    other = (
        await ctl.ok("pay", "--amount", "5", "--currency", "EUR", "--customer", "c2", "--json")
    ).json()
    listed = (await ctl.ok("payments", "list", "--customer", "test_customer", "--json")).json()
    assert [p["id"] for p in listed["data"]] == [payment_id]
    one_page = await ctl.ok("payments", "list", "--limit", "1")
    assert other["id"] in one_page.stdout
    assert "--cursor" in one_page.stdout
    every = (await ctl.ok("payments", "list", "--limit", "1", "--all", "--json")).json()
    assert [p["id"] for p in every["data"]] == [other["id"], payment_id]

    stats = (await ctl.ok("stats", "--json")).json()
    assert stats["payments"]["total"] == 2
    assert "payments: 2" in (await ctl.ok("stats")).stdout

    # The seed's webhook for this payment, signed and sent by the CLI.
    payload = ctl.cwd / "payload.json"
    payload.write_bytes(
        b'{"event_type":"payment.completed","payment_id":"%s","provider":"test_provider",'
        b'"data":{"reference":"%s"}}\n' % (payment_id.encode(), reference.encode())
    )
    signed = await ctl.ok("webhook", "sign", "payload.json", "--scheme", "seed")
    openssl = await asyncio.create_subprocess_exec(
        *("openssl", "dgst", "-sha256", "-hmac", "webhook-secret-key", str(payload)),
        stdout=subprocess.PIPE,
    )
    digest, _ = await openssl.communicate()
    assert signed.stdout == f"X-Webhook-Signature: {digest.decode().split()[-1]}\n"
    both = await ctl.ok("webhook", "sign", "payload.json")
    assert [line.split(": ")[0] for line in both.stdout.splitlines()] == [
        "X-Webhook-Signature",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ]

    receipt = (await ctl.ok("webhook", "send", "payload.json", "--json")).json()
    assert receipt["received"] is True
    assert receipt["scheme"] == "standard"
    assert receipt["already_stored"] is False
    await eventually(lambda: _is(status, "completed"), within=15, interval=0.2)
    resent = await ctl.ok("webhook", "send", "payload.json", "--scheme", "seed")
    assert receipt["event_id"] in resent.stdout
    assert "already stored: yes" in resent.stdout

    run = await ctl.ok("reconcile")
    assert "status:    completed" in run.stdout
    assert "checked:" in run.stdout
    assert "changes: none" in run.stdout
    requested = await ctl.ok("reconcile", "--no-wait")
    assert "requested" in requested.stdout

    # The API's refusals: exit 1 with its error code.
    unknown = await ctl("payments", "get", str(uuid.uuid4()))
    assert unknown.code == 1
    assert "payment_not_found" in unknown.stderr
    too_precise = await ctl("pay", "--amount", "1.001", "--customer", "c")
    assert too_precise.code == 1
    assert "amount_too_precise" in too_precise.stderr


async def _is(read: Any, expected: str) -> bool:
    return bool(await read() == expected)


def _requested(payment_id: uuid.UUID) -> Any:
    return wrap(
        PaymentRequested(
            payment_id=payment_id,
            reference=f"PAY-{payment_id.hex[:10].upper()}",
            amount_minor=2500,
            currency="EUR",
            customer_id="parked",
            requested_at=dt.datetime.now(dt.UTC),
        )
    )


async def publish(
    rabbitmq_url: str, exchange: str, routing_key: str, message: aio_pika.Message
) -> None:
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        await target.publish(message, routing_key=routing_key, mandatory=True)


async def test_parked_messages_listed_shown_replayed_and_purged(stack: Stack, ctl: Ctl) -> None:
    await stack.start("provider", **SLOW_SETTLEMENT)
    await stack.start("payments")
    await stack.start("gateway")
    topology = Topology()

    # Not a message at all: the payments service parks it at once as undecodable.
    await publish(
        stack.rabbitmq_url,
        topology.exchange,
        "payment.requested",
        aio_pika.Message(b"not a message", message_id="undecodable-1", type="payment.requested"),
    )

    async def parked() -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = (
            await ctl.ok("dlq", "list", "payment-requested", "--json")
        ).json()
        return messages

    [undecodable] = await eventually(parked, within=15, interval=0.2)
    assert undecodable["message_id"] == "undecodable-1"
    assert undecodable["reason"] == "undecodable"
    assert undecodable["routing_key"] == "payment.requested"

    everything = await ctl.ok("dlq", "list")
    assert "platform.payment-requested.parking: 1 parked" in everything.stdout
    assert "undecodable-1" in everything.stdout
    assert "platform.webhook-received.parking: empty" in everything.stdout
    assert "platform.reconciliation-requested.parking: empty" in everything.stdout

    shown = await ctl.ok("dlq", "show", "payment-requested", "undecodable-1")
    assert "reason:" in shown.stdout
    assert "undecodable" in shown.stdout
    assert "x-parked-error" in shown.stdout
    assert "not a message" in shown.stdout
    missing = await ctl("dlq", "show", "payment-requested", "no-such-message")
    assert missing.code == 1
    assert "no parked message" in missing.stderr

    # A valid request, parked as a consumer would have parked it; replayed, it succeeds.
    payment_id = uuid.uuid4()
    envelope = _requested(payment_id)
    await publish(
        stack.rabbitmq_url,
        topology.dead_letter_exchange,
        topology.payment_requested.name,
        to_amqp(
            envelope,
            headers={"x-original-routing-key": "payment.requested", "x-parked-reason": "test"},
        ),
    )
    assert {m["reason"] for m in await parked()} == {"undecodable", "test"}

    replayed = await ctl.ok("dlq", "replay", "payment-requested", str(envelope.message_id))
    assert "replayed 1 message" in replayed.stdout

    async def charged() -> bool:
        result = await ctl("payments", "get", str(payment_id), "--json")
        return result.code == 0 and result.json()["status"] == "processing"

    await eventually(charged, within=15, interval=0.2)
    assert [m["message_id"] for m in await parked()] == ["undecodable-1"]
    assert (await ctl("dlq", "replay", "payment-requested", "no-such-message")).code == 1

    unconfirmed = await ctl("dlq", "purge", "payment-requested", "--all")
    assert unconfirmed.code == 2
    assert "--yes" in unconfirmed.stderr
    purged = await ctl.ok("dlq", "purge", "payment-requested", "--all", "--yes")
    assert "purged 1 message" in purged.stdout
    assert await parked() == []


async def test_unreachable_gateway_and_broker_exit_3(tmp_path: Path) -> None:
    closed = free_port()
    ctl = Ctl(
        operator_env(
            PAYMENTS_URL=f"http://127.0.0.1:{closed}",
            RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{closed}/",
        ),
        tmp_path,
    )
    stats = await ctl("stats")
    assert stats.code == 3
    assert "cannot connect to the gateway" in stats.stderr
    assert stats.stdout == ""
    parked = await ctl("dlq", "list")
    assert parked.code == 3
    assert "cannot connect to RabbitMQ" in parked.stderr
    assert "guest:guest" not in parked.stderr
