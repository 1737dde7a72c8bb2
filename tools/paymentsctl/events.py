"""The payment events: `events list` reads the event log API, `events tail` the bus.

`tail` binds a temporary queue of its own (exclusive, deleted when it disconnects) to the
platform's exchange, so it sees every event published from then on and takes nothing
from anyone else's queue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from libs.common.broker.topology import Topology
from libs.common.messages import MessageDecodeError, PaymentEvent, decode
from tools.paymentsctl import output
from tools.paymentsctl.commands import Context, list_pages, list_query
from tools.paymentsctl.dlq import _redacted as redacted
from tools.paymentsctl.errors import OK, Unreachable, Usage

ALL_EVENTS = "payment.#"


async def events_list(args: argparse.Namespace, ctx: Context) -> int:
    query = list_query(args, type=args.type, payment_id=args.payment)
    async with ctx.gateway() as gateway:
        page = await list_pages(gateway.events, query, every=args.all)
    ctx.out.show(page, output.event_list(page.get("data") or [], page.get("next_cursor")))
    return OK


async def events_tail(args: argparse.Namespace, ctx: Context) -> int:
    """Print events as they arrive until --count of them came, --timeout passed, or Ctrl-C."""
    url = ctx.settings.rabbitmq_url.get_secret_value()
    exchange = Topology().exchange
    try:
        async with asyncio.timeout(ctx.settings.rabbitmq_connect_timeout_seconds * 2):
            connection = await aio_pika.connect(
                url,
                timeout=ctx.settings.rabbitmq_connect_timeout_seconds,
                client_properties={"connection_name": "paymentsctl events tail"},
            )
    except TimeoutError:
        raise Unreachable(f"cannot connect to RabbitMQ at {redacted(url)} in time") from None
    except (aio_pika.exceptions.AMQPError, OSError, ValueError) as exc:
        raise Unreachable(
            f"cannot connect to RabbitMQ at {redacted(url)} ({type(exc).__name__}: {exc})"
        ) from None
    seen = 0
    done = asyncio.Event()
    async with connection:
        channel = await connection.channel()
        try:
            target = await channel.get_exchange(exchange, ensure=True)
        except aio_pika.exceptions.ChannelClosed:
            raise Usage(
                f"no exchange {exchange} at {redacted(url)}: is RABBITMQ_URL the platform's vhost?"
            ) from None
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in args.type or [ALL_EVENTS]:
            await queue.bind(target, routing_key=key)
        # Only once bound: an event published after this line is printed.
        ctx.err.write(f"tailing {', '.join(args.type or [ALL_EVENTS])} on {exchange}\n")
        ctx.err.flush()

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen
            try:
                envelope = decode(message.body, PaymentEvent)
            except MessageDecodeError:
                # payment.# also matches the command payment.requested: not an event.
                return
            event: dict[str, Any] = envelope.model_dump(mode="json")
            if ctx.out.as_json:
                ctx.out.stream.write(json.dumps(event, ensure_ascii=False) + "\n")
            else:
                ctx.out.text(output.event_line(event))
            ctx.out.stream.flush()
            seen += 1
            if args.count is not None and seen >= args.count:
                done.set()

        await queue.consume(on_message, no_ack=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.timeout):
                await done.wait()
    if args.count is not None and seen < args.count:
        raise Unreachable(f"{seen} of {args.count} events arrived within {args.timeout:g} s")
    return OK
