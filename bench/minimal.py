"""The baselines: the least code that does the same job on the same broker and database.

`python -m bench.minimal MODE`:

- `publish`: an aiohttp handler that reads the body and publishes the same message the
  gateway would (same size, properties, exchange and routing key), persistent,
  `mandatory`, with publisher confirms, then answers 202: the framework and broker limit
  for `/pay` and `/api/webhooks`. With `--gateway-middlewares`, the same handler behind
  the gateway's own middlewares (correlation id, request metrics, JSON errors, API keys
  and rate limits): what the gateway costs before `/pay` does any work of its own.
- `consume`: a consumer of the same queue, with the same prefetch and pool size, that
  inserts one row per message and acks: the broker and database limit for a consumer.
- `provider`: a fake PSP that answers every call after a fixed delay, with a charge the
  platform's own client accepts (for the reconciler scenario).
- `reconcile`: the least a reconciliation can do: read the stale payments, ask the
  provider about each with the same concurrency, move each with one UPDATE.
- `seed`: the design our users come from, in one synchronous process: `POST
  /api/payments/pay` inserts the payment, calls the provider and answers; `POST
  /api/webhooks` checks the seed's `X-Webhook-Signature` and, in one transaction, records
  the webhook and updates the payment. No broker, no retries, no idempotency, no outbox:
  what the message-driven design is measured against end to end (bench/seed.py).

Each serving mode answers `GET /ready` once it is connected, and stops on SIGTERM.
Every mode runs on uvloop, as the services do: on asyncio's own loop the `publish`
handler costs a quarter more CPU per request, and a baseline that slow would flatter
every ratio taken against it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hmac
import json
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import uvloop
from aiohttp import web
from pydantic_settings import BaseSettings

from libs.common.broker.topology import Topology, declare
from libs.common.messages import Envelope, PaymentRequested, WebhookReceived, encode, wrap
from libs.common.provider_client import ProviderClient
from libs.common.settings import (
    BrokerSettings,
    GatewaySettings,
    PaymentsSettings,
    ProviderClientSettings,
    WebhooksSettings,
    load_settings,
)
from libs.common.signing import SEED_HEADER, seed_signature
from libs.common.web import create_service_app
from services.gateway.access import ApiKeys, RateLimits
from services.gateway.routes import API_KEYS, RATE_LIMITS, guard

SAMPLE_WEBHOOK = (
    b'{"event_id":"evt_0123456789abcdef01234567","event_type":"payment.completed",'
    b'"payment_id":"2f0c6a5e-8f0e-4a52-9a53-3f3c8d9c1e01","provider":"simulated",'
    b'"data":{"reference":"PAY-7K2M9Q4XTR","provider_reference":"ch_0123456789abcdef01234567",'
    b'"amount_minor":10000,"currency":"USD","status":"succeeded","decline_reason":null},'
    b'"created_at":"2026-11-26T10:00:00.123456+00:00"}'
)


def sample_envelope(routing_key: str) -> Envelope[Any]:
    """A message of the size and shape the gateway publishes under `routing_key`."""
    now = dt.datetime.now(dt.UTC)
    if routing_key == PaymentRequested.TYPE:
        return wrap(
            PaymentRequested(
                payment_id=uuid.uuid4(),
                reference="PAY-7K2M9Q4XTR",
                amount_minor=10000,
                currency="USD",
                customer_id="test_customer",
                description="Test payment from DevOps",
                metadata={},
                requested_at=now,
            )
        )
    if routing_key == WebhookReceived.TYPE:
        return wrap(
            WebhookReceived(
                raw_body=base64.b64encode(SAMPLE_WEBHOOK),
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "Python/3.11 aiohttp/3.14",
                    "webhook-id": "evt_0123456789abcdef01234567",
                    "webhook-timestamp": "1795600000",
                    "webhook-signature": "v1," + "A" * 43 + "=",
                    "X-Webhook-Signature": "0" * 64,
                },
                signature_scheme="standard",
                received_at=now,
                verified_at=now,
            )
        )
    raise ValueError(f"no sample message for {routing_key!r}")


async def _serve(app: web.Application, port: int, until: asyncio.Event) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await until.wait()
    finally:
        await runner.cleanup()


def _stop_on_sigterm() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _ready(_: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


def _gateway_middlewares_app() -> web.Application:
    """An app with the gateway's middlewares and none of its routes, built as the
    gateway builds them (services.gateway.routes.add_routes)."""
    settings = load_settings(GatewaySettings)
    app = create_service_app()  # it has its own /ready
    app[API_KEYS] = ApiKeys([k.get_secret_value() for k in settings.all_api_keys()])
    app[RATE_LIMITS] = RateLimits(settings.rate_limit, settings.webhook_failure_limit)
    app.middlewares.append(guard)
    return app


def _bare_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/ready", _ready)
    return app


async def publish(port: int, routing_key: str, *, gateway_middlewares: bool = False) -> None:
    stop = _stop_on_sigterm()
    topology = Topology()
    connection = await aio_pika.connect_robust(os.environ["RABBITMQ_URL"])
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await declare(channel, topology)
    exchange = await channel.get_exchange(topology.exchange, ensure=False)
    body = encode(sample_envelope(routing_key))

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        message_id = str(uuid.uuid4())
        await exchange.publish(
            aio_pika.Message(
                body=body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
                correlation_id=message_id,
                type=routing_key,
                timestamp=dt.datetime.now(dt.UTC),
                headers={"x-version": 1},
            ),
            routing_key,
            mandatory=True,
        )
        return web.json_response({"id": message_id, "status": "pending"}, status=202)

    app = _gateway_middlewares_app() if gateway_middlewares else _bare_app()
    app.router.add_post("/api/payments/pay", handle)
    app.router.add_post("/api/webhooks", handle)
    try:
        await _serve(app, port, stop)
    finally:
        await connection.close()


async def consume(port: int, purpose: str, prefetch: int, pool_size: int) -> None:
    stop = _stop_on_sigterm()
    topology = Topology()
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=pool_size)
    connection = await aio_pika.connect_robust(os.environ["RABBITMQ_URL"])
    channel = await connection.channel()
    await declare(channel, topology)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(f"{topology.namespace}.{purpose}", ensure=True)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await pool.execute(
            "INSERT INTO bench_sink (message_id) VALUES ($1) ON CONFLICT DO NOTHING",
            uuid.UUID(message.message_id),
        )
        await message.ack()

    tag = await queue.consume(on_message)
    app = web.Application()
    app.router.add_get("/ready", _ready)
    try:
        await _serve(app, port, stop)
    finally:
        await queue.cancel(tag)
        await connection.close()
        await pool.close()


def fake_charge(payment_id: str, status: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).isoformat()
    return {
        "id": "ch_" + uuid.UUID(payment_id).hex[:24],
        "payment_id": payment_id,
        "reference": "PAY-BENCH",
        "amount_minor": 10000,
        "currency": "USD",
        "customer_id": "bench",
        "status": status,
        "decline_reason": None,
        "created_at": now,
        "settled_at": now if status != "processing" else None,
    }


async def provider(port: int, delay_ms: int) -> None:
    stop = _stop_on_sigterm()
    delay = delay_ms / 1000

    def slow(
        handler: Callable[[web.Request], Awaitable[web.Response]],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def wrapped(request: web.Request) -> web.Response:
            await asyncio.sleep(delay)
            return await handler(request)

        return wrapped

    async def find(request: web.Request) -> web.Response:
        return web.json_response({"data": [fake_charge(request.query["payment_id"], "succeeded")]})

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(fake_charge(body["payment_id"], "processing"), status=201)

    app = web.Application()
    app.router.add_get("/charges", slow(find))
    app.router.add_post("/charges", slow(create))
    app.router.add_get("/ready", _ready)
    await _serve(app, port, stop)


async def reconcile(provider_url: str, concurrency: int, min_age_seconds: int) -> dict[str, Any]:
    started = time.perf_counter()
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=10)
    try:
        rows = await pool.fetch(
            "SELECT id FROM payments.payments WHERE status IN ('pending', 'processing')"
            " AND created_at < now() - make_interval(secs => $1) ORDER BY created_at, id",
            min_age_seconds,
        )
        gate = asyncio.Semaphore(concurrency)
        settled = 0
        async with aiohttp.ClientSession() as session:

            async def settle(payment_id: uuid.UUID) -> None:
                nonlocal settled
                async with gate:
                    async with session.get(
                        f"{provider_url}/charges", params={"payment_id": str(payment_id)}
                    ) as response:
                        charge = json.loads(await response.read(), parse_float=Decimal)["data"][0]
                    status = {"succeeded": "completed", "declined": "failed"}.get(
                        charge["status"], "processing"
                    )
                    done = await pool.execute(
                        "UPDATE payments.payments SET status = $2"
                        " WHERE id = $1 AND status IN ('pending', 'processing')",
                        payment_id,
                        status,
                    )
                    settled += done == "UPDATE 1"

            await asyncio.gather(*(settle(row["id"]) for row in rows))
    finally:
        await pool.close()
    return {"checked": len(rows), "settled": settled, "elapsed_s": time.perf_counter() - started}


SEED_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS seed;
CREATE TABLE IF NOT EXISTS seed.payments (
    id uuid PRIMARY KEY,
    reference text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    customer_id text NOT NULL,
    description text,
    status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS seed.webhooks (
    id bigserial PRIMARY KEY,
    event_type text NOT NULL,
    payment_id uuid NOT NULL,
    payload jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
"""
SEED_STATUS = {"payment.completed": "completed", "payment.failed": "failed"}


async def seed(port: int) -> None:
    stop = _stop_on_sigterm()
    settings = load_settings(ProviderClientSettings)
    secret = load_settings(GatewaySettings).webhook_secret[0].get_secret_value()
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=10)
    await pool.execute(SEED_SCHEMA)
    session = aiohttp.ClientSession()
    client = ProviderClient(
        session, settings.provider_url, timeout_seconds=settings.provider_timeout_seconds
    )

    async def pay(request: web.Request) -> web.Response:
        body = await request.json()
        payment_id = uuid.uuid4()
        reference = "PAY-" + payment_id.hex[:10].upper()
        amount_minor = int(Decimal(str(body["amount"])) * 100)
        customer_id = str(body["customer_id"])
        await pool.execute(
            "INSERT INTO seed.payments (id, reference, amount_minor, currency, customer_id,"
            " description, status) VALUES ($1, $2, $3, 'USD', $4, $5, 'pending')",
            payment_id,
            reference,
            amount_minor,
            customer_id,
            body.get("description"),
        )
        await client.create_charge(
            payment_id=payment_id,
            reference=reference,
            amount_minor=amount_minor,
            currency="USD",
            customer_id=customer_id,
        )
        return web.json_response(
            {"id": str(payment_id), "reference": reference, "status": "pending"}, status=201
        )

    async def webhook(request: web.Request) -> web.Response:
        raw = await request.read()
        given = request.headers.get(SEED_HEADER, "")
        if not hmac.compare_digest(given, seed_signature(raw, secret)):
            return web.json_response({"error": "invalid_signature"}, status=401)
        event = json.loads(raw)
        payment_id = uuid.UUID(event["payment_id"])
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO seed.webhooks (event_type, payment_id, payload) VALUES ($1, $2, $3)",
                event["event_type"],
                payment_id,
                raw.decode(),
            )
            await conn.execute(
                "UPDATE seed.payments SET status = $2, updated_at = now() WHERE id = $1",
                payment_id,
                SEED_STATUS.get(event["event_type"], "pending"),
            )
        return web.json_response({"received": True})

    app = _bare_app()
    app.router.add_post("/api/payments/pay", pay)
    app.router.add_post("/api/webhooks", webhook)
    try:
        await _serve(app, port, stop)
    finally:
        await session.close()
        await pool.close()


# Who consumes each queue, so the baseline holds as much work at once as that service.
CONSUMERS: dict[str, type[BaseSettings]] = {
    "payment-requested": PaymentsSettings,
    "webhook-received": WebhooksSettings,
}


def _default(settings: type[BaseSettings], name: str) -> int:
    value = settings.model_fields[name].default
    if not isinstance(value, int):
        raise TypeError(f"{settings.__name__}.{name} has no integer default")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("publish")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--routing-key", default=PaymentRequested.TYPE)
    p.add_argument(
        "--gateway-middlewares", action="store_true", help="behind the gateway's middlewares"
    )
    c = modes.add_parser("consume")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--queue", default="payment-requested", help="the queue's purpose name")
    # Default: the prefetch and pool of the service consuming that queue.
    c.add_argument("--prefetch", type=int)
    c.add_argument("--pool", type=int)
    f = modes.add_parser("provider")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--delay-ms", type=int, default=20)
    s = modes.add_parser("seed")
    s.add_argument("--port", type=int, required=True)
    r = modes.add_parser("reconcile")
    r.add_argument("--provider-url", required=True)
    r.add_argument("--concurrency", type=int, default=20)
    r.add_argument("--min-age-seconds", type=int, default=60)
    args = parser.parse_args()
    if args.mode == "publish":
        uvloop.run(
            publish(args.port, args.routing_key, gateway_middlewares=args.gateway_middlewares)
        )
    elif args.mode == "consume":
        service = CONSUMERS.get(args.queue, BrokerSettings)
        prefetch = args.prefetch or _default(service, "consumer_prefetch")
        pool = args.pool or _default(service, "db_pool_max_size")
        uvloop.run(consume(args.port, args.queue, prefetch, pool))
    elif args.mode == "provider":
        uvloop.run(provider(args.port, args.delay_ms))
    elif args.mode == "seed":
        uvloop.run(seed(args.port))
    else:
        print(
            json.dumps(
                uvloop.run(reconcile(args.provider_url, args.concurrency, args.min_age_seconds))
            )
        )


if __name__ == "__main__":
    main()
