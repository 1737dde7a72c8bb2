"""The parking-queue commands, through RabbitMQ: list, show, replay, purge.

They use `libs.common.broker.parking.ParkingLot` over a `Broker` connected with the
platform's default topology, exactly as the services see it.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika

from libs.common.broker.connection import Broker
from libs.common.broker.parking import ParkingLot
from libs.common.broker.publisher import PublishError
from libs.common.broker.topology import QueueSpec
from libs.common.settings import CtlSettings
from tools.paymentsctl import output
from tools.paymentsctl.commands import Context
from tools.paymentsctl.errors import OK, CtlError, NotFound, Unreachable, Usage


def _redacted(urls: str) -> str:
    """RABBITMQ_URL (one URL, or one per cluster node) without its passwords."""
    redacted = []
    for url in urls.split(","):
        parts = urlsplit(url.strip())
        if parts.password is not None:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
            parts = parts._replace(netloc=netloc)
        redacted.append(urlunsplit(parts))
    return ",".join(redacted)


@contextlib.asynccontextmanager
async def parking_lot(settings: CtlSettings) -> AsyncIterator[ParkingLot]:
    url = settings.rabbitmq_url.get_secret_value()  # checked by the settings
    try:
        # Look, do not declare: the wrong vhost must not end up with the platform's queues.
        broker = await Broker.connect(settings, name="paymentsctl", declare_topology=False)
    except TimeoutError:
        raise Unreachable(f"cannot connect to RabbitMQ at {_redacted(url)} in time") from None
    except (aio_pika.exceptions.AMQPError, OSError, ValueError) as exc:
        raise Unreachable(
            f"cannot connect to RabbitMQ at {_redacted(url)} ({type(exc).__name__}: {exc})"
        ) from None
    try:
        yield ParkingLot(broker)
    finally:
        await broker.close()


def _queue(lot: ParkingLot, name: str) -> QueueSpec:
    try:
        return lot.queue(name)
    except LookupError as exc:
        raise Usage(str(exc)) from None


async def list_parked(args: argparse.Namespace, ctx: Context) -> int:
    async with parking_lot(ctx.settings) as lot:
        queues = [_queue(lot, args.queue)] if args.queue else list(lot.queues())
        found = [(spec, await lot.browse(spec)) for spec in queues]
    ctx.out.show(
        [output.parked_json(m) for _, messages in found for m in messages],
        "\n\n".join(output.parked_list(spec.name, messages) for spec, messages in found),
    )
    return OK


async def show(args: argparse.Namespace, ctx: Context) -> int:
    async with parking_lot(ctx.settings) as lot:
        spec = _queue(lot, args.queue)
        message = await lot.show(spec, args.message_id)
    if message is None:
        raise NotFound(f"no parked message {args.message_id} in {spec.parking}")
    ctx.out.show(output.parked_json(message), output.parked_detail(message))
    return OK


async def replay(args: argparse.Namespace, ctx: Context) -> int:
    async with parking_lot(ctx.settings) as lot:
        spec = _queue(lot, args.queue)
        try:
            count = await lot.replay(spec, None if args.all else args.message_id)
        except PublishError as exc:
            # The message was not taken: it stays parked.
            raise CtlError(f"replay not confirmed by the broker, nothing removed: {exc}") from None
    return _report(ctx, args, spec, count, "replayed")


async def purge(args: argparse.Namespace, ctx: Context) -> int:
    if args.all and not args.yes:
        raise Usage(
            f"purge --all deletes every parked message of {args.queue} for good;"
            " add --yes to confirm"
        )
    async with parking_lot(ctx.settings) as lot:
        spec = _queue(lot, args.queue)
        count = await lot.purge(spec, None if args.all else args.message_id)
    return _report(ctx, args, spec, count, "purged")


def _report(ctx: Context, args: argparse.Namespace, spec: QueueSpec, count: int, verb: str) -> int:
    if not args.all and count == 0:
        raise NotFound(f"no parked message {args.message_id} in {spec.parking}")
    plural = "message" if count == 1 else "messages"
    ctx.out.show(
        {"queue": spec.name, verb: count},
        f"{verb} {count} {plural} from {spec.parking}",
    )
    return OK
