"""The commands that talk to the gateway: pay, payments, refund(s), cancel, stats, webhook,
reconcile."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from libs.common import signing
from libs.common.settings import CtlSettings
from tools.paymentsctl import output
from tools.paymentsctl.api import Gateway
from tools.paymentsctl.errors import OK, REFUSED, Refused, Unreachable, Usage
from tools.paymentsctl.output import Output

RUN_TIMEOUT_SECONDS = 120.0
RUN_POLL_SECONDS = 0.5
# A run that ends like this did not settle everything it looked at.
UNSUCCESSFUL_RUNS = ("failed", "partial")


@dataclasses.dataclass(frozen=True)
class Context:
    settings: CtlSettings
    out: Output
    err: TextIO
    http_timeout: float

    def gateway(self) -> Gateway:
        key = self.settings.payments_api_key
        return Gateway(
            self.settings.payments_url,
            api_key=key.get_secret_value() if key else None,
            timeout=self.http_timeout,
        )


# --- payments ---------------------------------------------------------------------------------


async def pay(args: argparse.Namespace, ctx: Context) -> int:
    # The amount stays the string typed, so the gateway reads it exactly.
    order: dict[str, Any] = {"amount": args.amount, "customer_id": args.customer}
    if args.currency is not None:
        order["currency"] = args.currency
    if args.description is not None:
        order["description"] = args.description
    if args.metadata:
        order["metadata"] = dict(args.metadata)
    async with ctx.gateway() as gateway:
        reply = await gateway.pay(order, args.idempotency_key)
    replayed = reply.headers.get("Idempotent-Replayed") == "true"
    ctx.out.show(reply.body, output.accepted(reply.body, replayed=replayed))
    return OK


async def payments_get(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.gateway() as gateway:
        payment = await gateway.payment(args.id)
    ctx.out.show(payment, output.payment_detail(payment))
    return OK


async def payments_list(args: argparse.Namespace, ctx: Context) -> int:
    query = list_query(args, status=args.status, customer_id=args.customer)
    async with ctx.gateway() as gateway:
        page = await list_pages(gateway.payments, query, every=args.all)
    ctx.out.show(page, output.payment_list(page.get("data") or [], page.get("next_cursor")))
    return OK


def list_query(args: argparse.Namespace, **filters: object) -> dict[str, str]:
    """A list route's query string: the given filters plus the shared range and paging ones."""
    given = {
        **filters,
        "created_from": args.created_from,
        "created_to": args.created_to,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    return {name: str(value) for name, value in given.items() if value is not None}


async def list_pages(
    fetch: Callable[[dict[str, str]], Awaitable[dict[str, Any]]],
    query: dict[str, str],
    *,
    every: bool,
) -> dict[str, Any]:
    """One page of a cursor-paginated list, or with `every` all of them as one page."""
    page = await fetch(query)
    if not every:
        return page
    data = list(page.get("data") or [])
    while page.get("next_cursor"):
        page = await fetch({**query, "cursor": page["next_cursor"]})
        data += page.get("data") or []
    return {"data": data, "next_cursor": None}


async def refund(args: argparse.Namespace, ctx: Context) -> int:
    body: dict[str, Any] = {}
    if args.amount is not None:
        # The string typed, so the gateway reads it exactly.
        body["amount"] = args.amount
    if args.reason is not None:
        body["reason"] = args.reason
    async with ctx.gateway() as gateway:
        reply = await gateway.refund(args.payment_id, body, args.idempotency_key)
    replayed = reply.headers.get("Idempotent-Replayed") == "true"
    ctx.out.show(reply.body, output.refund_accepted(reply.body, replayed=replayed))
    return OK


async def refunds_list(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.gateway() as gateway:
        page = await gateway.refunds(args.payment_id)
    ctx.out.show(page, output.refund_list(page.get("data") or []))
    return OK


async def refunds_get(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.gateway() as gateway:
        body = await gateway.refund_by_id(args.id)
    ctx.out.show(body, output.refund_fields(body))
    return OK


async def cancel(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.gateway() as gateway:
        payment = await gateway.cancel(args.payment_id)
    ctx.out.show(payment, output.payment_detail(payment))
    return OK


async def stats(_: argparse.Namespace, ctx: Context) -> int:
    async with ctx.gateway() as gateway:
        body = await gateway.stats()
    ctx.out.show(body, output.stats(body))
    return OK


# --- webhooks ---------------------------------------------------------------------------------


def read_payload(file: str) -> bytes:
    """The file's exact bytes: what is signed is what is sent."""
    if file == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(file).read_bytes()
    except OSError as exc:
        raise Usage(f"cannot read {file}: {exc.strerror or exc}") from None


def signature_headers(
    body: bytes,
    secret: str,
    *,
    scheme: str,
    message_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The headers that sign `body` under `scheme` (seed, standard or both)."""
    message_id = message_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    both = signing.signature_headers(body, [secret], message_id=message_id, timestamp=timestamp)
    if scheme == "seed":
        return {signing.SEED_HEADER: both[signing.SEED_HEADER]}
    if scheme == "standard":
        return {k: v for k, v in both.items() if k != signing.SEED_HEADER}
    return both


def _headers_for(args: argparse.Namespace, ctx: Context, body: bytes) -> dict[str, str]:
    secret = ctx.settings.webhook_secret[0].get_secret_value()
    return signature_headers(
        body, secret, scheme=args.scheme, message_id=args.id, timestamp=args.timestamp
    )


async def webhook_sign(args: argparse.Namespace, ctx: Context) -> int:
    headers = _headers_for(args, ctx, read_payload(args.file))
    ctx.out.show(headers, output.header_lines(headers))
    return OK


async def webhook_send(args: argparse.Namespace, ctx: Context) -> int:
    body = read_payload(args.file)
    headers = _headers_for(args, ctx, body)
    async with ctx.gateway() as gateway:
        receipt = await gateway.send_webhook(body, headers)
    ctx.out.show(receipt, output.receipt(receipt))
    return OK


# --- reconciliation ---------------------------------------------------------------------------


async def reconcile(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.gateway() as gateway:
        requested = await gateway.start_run()
        run_id = str(requested.get("id"))
        if args.no_wait:
            ctx.out.show(requested, f"run {run_id} requested")
            return OK
        run = await wait_for_run(gateway, run_id, within=args.timeout)
    ctx.out.show(run, output.run_summary(run))
    if run.get("status") in UNSUCCESSFUL_RUNS:
        ctx.err.write(f"paymentsctl: run {run_id} ended {run.get('status')}\n")
        return REFUSED
    return OK


async def wait_for_run(
    gateway: Gateway, run_id: str, *, within: float, interval: float = RUN_POLL_SECONDS
) -> dict[str, Any]:
    """Poll the run until it has finished; until it starts, the API answers 404."""
    deadline = time.monotonic() + within
    while True:
        run: dict[str, Any] | None
        try:
            run = await gateway.run(run_id)
        except Refused as exc:
            if exc.status != 404:
                raise
            run = None
        if run is not None and run.get("finished_at"):
            return run
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            state = (
                f"still {run.get('status')}" if run else "not started: is the reconciler running?"
            )
            raise Unreachable(f"run {run_id} did not finish within {within:g} s ({state})")
        await asyncio.sleep(min(interval, remaining))
