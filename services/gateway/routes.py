"""The gateway's HTTP routes: decode the request, call the business function, encode."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from libs.common.web import BROKER, DATABASE, read_body, require_json
from services.gateway.idempotency import IdempotencyKeys, check_key
from services.gateway.intake import accept_payment
from services.gateway.queries import (
    get_payment,
    list_payments,
    parse_list_query,
    parse_payment_id,
    payment_stats,
)
from services.gateway.validation import MAX_BODY_BYTES, parse_json_object, parse_payment_order

IDEMPOTENCY_KEYS = web.AppKey("idempotency_keys", IdempotencyKeys)
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
# Without API keys every caller shares one idempotency namespace.
ANONYMOUS_SCOPE = "anonymous"


async def pay(request: web.Request) -> web.Response:
    require_json(request)
    order = parse_payment_order(parse_json_object(await read_body(request, MAX_BODY_BYTES)))
    key = request.headers.get("Idempotency-Key")
    accepted = await accept_payment(
        order,
        publish=request.app[BROKER].publish,
        keys=request.app[IDEMPOTENCY_KEYS],
        idempotency_key=check_key(key) if key is not None else None,
        scope=ANONYMOUS_SCOPE,
    )
    headers = {"Location": f"/api/payments/{accepted.body['id']}"}
    if accepted.replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(accepted.body, status=accepted.status, headers=headers)


async def get_one(request: web.Request) -> web.Response:
    payment_id = parse_payment_id(request.match_info["payment_id"])
    return web.json_response(await get_payment(request.app[DATABASE], payment_id))


async def get_page(request: web.Request) -> web.Response:
    query = parse_list_query(request.query)
    return web.json_response(await list_payments(request.app[DATABASE], query))


async def stats(request: web.Request) -> web.Response:
    return web.json_response(await payment_stats(request.app[DATABASE]))


async def openapi(_: web.Request) -> web.FileResponse:
    return web.FileResponse(OPENAPI_PATH, headers={"Content-Type": "application/json"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/payments/pay", pay)
    # Before /{payment_id}, which would otherwise take "stats" for an id.
    app.router.add_get("/api/payments/stats", stats)
    app.router.add_get("/api/payments/{payment_id}", get_one)
    app.router.add_get("/api/payments", get_page)
    app.router.add_get("/api/openapi.json", openapi)
