"""The gateway's HTTP routes: decode the request, call the business function, encode."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from aiohttp import web

from libs.common.cancellation import cancel_payment
from libs.common.errors import ApiError
from libs.common.refunds import get_refund, list_refunds, refund_json
from libs.common.settings import GatewaySettings
from libs.common.web import BROKER, DATABASE, read_body, read_json_object
from services.gateway import events
from services.gateway.access import ANONYMOUS, PROTECTED_PREFIXES, ApiKeys, RateLimits
from services.gateway.idempotency import IdempotencyKeys, check_key
from services.gateway.intake import accept_payment
from services.gateway.queries import (
    get_payment,
    list_payments,
    parse_list_query,
    parse_payment_id,
    payment_stats,
)
from services.gateway.reconciliations import (
    get_run,
    list_runs,
    parse_limit,
    parse_run_id,
    request_run,
)
from services.gateway.refunds import parse_refund_order, request_refund
from services.gateway.validation import MAX_BODY_BYTES, parse_payment_order
from services.gateway.webhooks import MAX_WEBHOOK_BYTES, get_event, parse_event_id, receive_webhook

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IDEMPOTENCY_KEYS = web.AppKey("idempotency_keys", IdempotencyKeys)
GATEWAY_SETTINGS = web.AppKey("gateway_settings", GatewaySettings)
API_KEYS = web.AppKey("api_keys", ApiKeys)
RATE_LIMITS = web.AppKey("rate_limits", RateLimits)
# Who is calling: an API key's id, or "anonymous" without API keys.
CLIENT = web.RequestKey("client", str)
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
ASYNCAPI_PATH = Path(__file__).with_name("asyncapi.json")
DOCS_PAGE = Path(__file__).with_name("docs.html")
DOCS_SCRIPT = Path(__file__).with_name("docs.js")
# Swagger UI's files as the swagger-ui-py package ships them (found, not imported).
SWAGGER_UI_STATIC = Path(str(files("swagger_ui").joinpath("static")))


def _address(request: web.Request) -> str:
    return request.remote or "unknown"


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """API keys and rate limits for the API; the signature-failure limit for webhooks."""
    if request.path.startswith(PROTECTED_PREFIXES):
        identity = request.app[API_KEYS].identify(request.headers.get("Authorization"))
        limited_as = identity if identity != ANONYMOUS else f"address:{_address(request)}"
        await request.app[RATE_LIMITS].admit(limited_as)
        request[CLIENT] = identity
    elif request.path == "/api/webhooks":
        await request.app[RATE_LIMITS].admit_webhook(_address(request))
    return await handler(request)


async def pay(request: web.Request) -> web.Response:
    order = parse_payment_order(await read_json_object(request, MAX_BODY_BYTES))
    key = request.headers.get("Idempotency-Key")
    accepted = await accept_payment(
        order,
        publish=request.app[BROKER].publish,
        keys=request.app[IDEMPOTENCY_KEYS],
        idempotency_key=check_key(key) if key is not None else None,
        # Each API key has its own idempotency keys.
        scope=request[CLIENT],
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


async def refund(request: web.Request) -> web.Response:
    payment_id = parse_payment_id(request.match_info["payment_id"])
    # Every field is optional: no body at all asks for what is left, in full.
    body = await read_json_object(request, MAX_BODY_BYTES) if request.can_read_body else {}
    order = parse_refund_order(body)
    key = request.headers.get("Idempotency-Key")
    answer = await request_refund(
        request.app[DATABASE],
        payment_id,
        order,
        owner=request[CLIENT],
        publish=request.app[BROKER].publish,
        keys=request.app[IDEMPOTENCY_KEYS],
        idempotency_key=check_key(key) if key is not None else None,
    )
    headers = {"Location": f"/api/refunds/{answer.body['id']}"} if answer.status == 202 else {}
    if answer.replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(answer.body, status=answer.status, headers=headers)


async def payment_refunds(request: web.Request) -> web.Response:
    payment_id = parse_payment_id(request.match_info["payment_id"])
    rows = await list_refunds(request.app[DATABASE], payment_id, request[CLIENT])
    return web.json_response({"data": [refund_json(row) for row in rows]})


async def get_refund_route(request: web.Request) -> web.Response:
    try:
        refund_id = uuid.UUID(request.match_info["refund_id"])
    except ValueError:
        raise ApiError(400, "invalid_refund_id", "A refund id is a UUID.") from None
    row = await get_refund(request.app[DATABASE], refund_id, request[CLIENT])
    return web.json_response(refund_json(row))


async def cancel(request: web.Request) -> web.Response:
    payment_id = parse_payment_id(request.match_info["payment_id"])
    await cancel_payment(request.app[DATABASE], payment_id, request[CLIENT])
    return web.json_response(await get_payment(request.app[DATABASE], payment_id))


async def stats(request: web.Request) -> web.Response:
    return web.json_response(await payment_stats(request.app[DATABASE]))


async def webhook(request: web.Request) -> web.Response:
    settings = request.app[GATEWAY_SETTINGS]
    try:
        body = await receive_webhook(
            await read_body(request, MAX_WEBHOOK_BYTES),
            request.headers,
            secrets=[secret.get_secret_value() for secret in settings.webhook_secret],
            publish=request.app[BROKER].publish,
            db=request.app[DATABASE],
        )
    except ApiError as exc:
        if exc.status == 401:
            await request.app[RATE_LIMITS].signature_failed(_address(request))
        raise
    return web.json_response(body, status=202)


async def get_webhook(request: web.Request) -> web.Response:
    event_id = parse_event_id(request.match_info["event_id"])
    return web.json_response(await get_event(request.app[DATABASE], event_id))


async def request_reconciliation(request: web.Request) -> web.Response:
    run = await request_run(request.app[BROKER].publish)
    return web.json_response(
        run, status=202, headers={"Location": f"/api/reconciliations/{run['id']}"}
    )


async def reconciliation_runs(request: web.Request) -> web.Response:
    limit = parse_limit(request.query.get("limit"))
    return web.json_response(await list_runs(request.app[DATABASE], limit))


async def reconciliation_run(request: web.Request) -> web.Response:
    run_id = parse_run_id(request.match_info["run_id"])
    return web.json_response(await get_run(request.app[DATABASE], run_id))


async def event_page(request: web.Request) -> web.Response:
    query = events.parse_events_query(request.query)
    return web.json_response(await events.events_page(request.app[DATABASE], query))


async def event(request: web.Request) -> web.Response:
    event_id = events.parse_event_id(request.match_info["event_id"])
    return web.json_response(await events.one_event(request.app[DATABASE], event_id))


async def asyncapi(_: web.Request) -> web.FileResponse:
    return web.FileResponse(ASYNCAPI_PATH, headers={"Content-Type": "application/json"})


async def openapi(_: web.Request) -> web.FileResponse:
    return web.FileResponse(OPENAPI_PATH, headers={"Content-Type": "application/json"})


async def docs(_: web.Request) -> web.FileResponse:
    return web.FileResponse(DOCS_PAGE, headers={"Content-Type": "text/html; charset=utf-8"})


async def docs_script(_: web.Request) -> web.FileResponse:
    return web.FileResponse(DOCS_SCRIPT, headers={"Content-Type": "text/javascript"})


def add_routes(app: web.Application) -> None:
    settings = app[GATEWAY_SETTINGS]
    # API keys and rate limits in front of every route.
    app[API_KEYS] = ApiKeys([k.get_secret_value() for k in settings.all_api_keys()])
    app[RATE_LIMITS] = RateLimits(settings.rate_limit, settings.webhook_failure_limit)
    app.middlewares.append(guard)
    app.router.add_post("/api/payments/pay", pay)
    # Before /{payment_id}, which would otherwise take "stats" for an id.
    app.router.add_get("/api/payments/stats", stats)
    app.router.add_get("/api/payments/{payment_id}", get_one)
    app.router.add_post("/api/payments/{payment_id}/refunds", refund)
    app.router.add_get("/api/payments/{payment_id}/refunds", payment_refunds)
    app.router.add_post("/api/payments/{payment_id}/cancel", cancel)
    app.router.add_get("/api/refunds/{refund_id}", get_refund_route)
    app.router.add_get("/api/payments", get_page)
    app.router.add_post("/api/webhooks", webhook)
    app.router.add_get("/api/webhooks/{event_id}", get_webhook)
    app.router.add_post("/api/reconciliations", request_reconciliation)
    app.router.add_get("/api/reconciliations", reconciliation_runs)
    app.router.add_get("/api/reconciliations/{run_id}", reconciliation_run)
    app.router.add_get("/api/events", event_page)
    app.router.add_get("/api/events/{event_id}", event)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_get("/api/asyncapi.json", asyncapi)
    app.router.add_get("/api/docs", docs)
    app.router.add_get("/api/docs/initializer.js", docs_script)
    app.router.add_static("/api/docs/static", SWAGGER_UI_STATIC)
