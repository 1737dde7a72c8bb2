"""The aiohttp application every service is built on.

`create_service_app` gives each service the same skeleton: `/health` (the process is
alive), `/ready` (every resource it holds answers), `/metrics`, JSON errors, request
metrics and a correlation id per request. Resources are attached with one cleanup
context each (`database_context`, `broker_context`, `consumer_context`); aiohttp tears
them down in reverse order on SIGTERM, so consumers stop taking messages and finish
in-flight work before the broker connection and the pool close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from libs.common.backoff import Backoff
from libs.common.broker.connection import Broker
from libs.common.broker.consumer import BatchHandler, Consumer, Handler
from libs.common.broker.topology import QueueSpec, Topology
from libs.common.db import Database, is_transient
from libs.common.errors import ApiError as ApiError  # re-exported for route modules
from libs.common.errors import service_unavailable
from libs.common.json_body import JsonError, check_json, parse_object
from libs.common.logs import (
    ACCESS_LOGGER,
    CORRELATION_HEADER,
    configure_logging,
    correlation_scope,
)
from libs.common.messages import P
from libs.common.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS
from libs.common.provider_client import ProviderClient
from libs.common.settings import (
    DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
    BaseServiceSettings,
    BrokerSettings,
    DatabaseSettings,
    ProviderClientSettings,
    S,
    load_settings,
)
from libs.common.shutdown import bounded, stop_task

log = logging.getLogger(__name__)
# One line per request (ACCESS_LOG), with a formatter of its own (see logs.py).
access_log = logging.getLogger(ACCESS_LOGGER)

DATABASE = web.AppKey("database", Database)
BROKER = web.AppKey("broker", Broker)
PROVIDER = web.AppKey("provider", ProviderClient)
# The bound on each resource's stop: SHUTDOWN_TIMEOUT_SECONDS of the settings the pool and
# broker contexts are built with (every service has one), read by every cleanup context.
SHUTDOWN_TIMEOUT = web.AppKey("shutdown_timeout", float)
# Whether this app writes an access line per request (the gateway's ACCESS_LOG).
ACCESS_LOG = web.AppKey("access_log", bool)

_CORRELATION_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
READY_TIMEOUT_SECONDS = 2.0
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def _error_code(exc: web.HTTPException) -> str:
    return re.sub(r"[^a-z0-9]+", "_", (exc.reason or "error").lower()).strip("_")


def _route_label(request: web.Request) -> str:
    # The route template, never the raw path: unknown paths must not create new series.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    incoming = request.headers.get(CORRELATION_HEADER, "")
    with correlation_scope(incoming if _CORRELATION_ID_RE.match(incoming) else None) as cid:
        started = time.perf_counter()
        status = 500
        try:
            response = await _answer_in_json(request, handler)
            status = response.status
            response.headers[CORRELATION_HEADER] = cid
            return response
        finally:
            elapsed = time.perf_counter() - started
            route = _route_label(request)
            HTTP_REQUESTS.labels(route=route, method=request.method, status=str(status)).inc()
            HTTP_REQUEST_DURATION.labels(route=route, method=request.method).observe(elapsed)
            if request.app[ACCESS_LOG] and access_log.isEnabledFor(logging.INFO):
                # What was asked and answered, never a header or a body (secrets live there);
                # the correlation id comes with the line (the filter adds it).
                access_log.info(
                    "request",
                    extra={
                        "access": {
                            "method": request.method,
                            "route": route,
                            "path": request.path,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 3),
                            "client": request.remote,
                        }
                    },
                )


async def _answer_in_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _render(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Keep what the status needs (Allow on 405, Retry-After); the body is ours now.
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
        message = {
            404: f"There is no route {request.method} {request.path}.",
            405: f"{request.method} is not allowed on {request.path}.",
        }.get(exc.status, exc.reason)
        return _render(ApiError(exc.status, _error_code(exc), message, headers=headers))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if is_transient(exc):
            # The database or the network is away: the client may retry, it is not a bug.
            log.warning("dependency unavailable", extra={"path": request.path, "error": repr(exc)})
            return _render(
                service_unavailable("service_unavailable", "A dependency is unavailable; retry.")
            )
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return _render(ApiError(500, "internal_error", "The server failed to handle the request."))


def _render(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def require_json(request: web.Request) -> None:
    if request.content_type != "application/json" or request.charset not in (None, "utf-8"):
        raise ApiError(
            415, "unsupported_media_type", "Send the body as Content-Type: application/json."
        )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes without reading them all."""
    too_large = ApiError(413, "payload_too_large", f"The body must be at most {limit} bytes.")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def refuse_json(exc: JsonError) -> ApiError:
    """The answer to a body libs.common.json_body refused: always a 400."""
    return ApiError(400, exc.code, exc.message)


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any]:
    """A JSON request's body as an object: Content-Type, then at most `limit` bytes, then
    libs.common.json_body's strict parse (UTF-8, depth, syntax, an object)."""
    require_json(request)
    raw = await read_body(request, limit)
    try:
        return parse_object(raw).value
    except JsonError as exc:
        raise refuse_json(exc) from None


async def read_checked_json(request: web.Request, limit: int) -> bytes:
    """At most `limit` bytes of UTF-8 JSON nested no deeper than json_body allows, for a
    route that hands the bytes to pydantic's own JSON parser."""
    raw = await read_body(request, limit)
    try:
        check_json(raw)
    except JsonError as exc:
        raise refuse_json(exc) from None
    return raw


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    app = request.app
    checks: dict[str, Callable[[], Awaitable[None]]] = {}
    if DATABASE in app:
        checks["database"] = lambda: app[DATABASE].ping(READY_TIMEOUT_SECONDS)
    if BROKER in app:
        checks["broker"] = lambda: app[BROKER].ping(READY_TIMEOUT_SECONDS)
    results = await asyncio.gather(*(check() for check in checks.values()), return_exceptions=True)
    report = {
        name: "ok" if result is None else f"unavailable: {result!r}"
        for name, result in zip(checks, results, strict=True)
    }
    if all(result is None for result in results):
        return web.json_response({"status": "ready", "checks": report})
    return web.json_response(
        {"error": "not_ready", "message": "A dependency is unavailable.", "checks": report},
        status=503,
    )


async def metrics(_: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response


def create_service_app() -> web.Application:
    app = web.Application(middlewares=[observe_requests], client_max_size=1024**2)
    app[ACCESS_LOG] = False
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app


def shutdown_timeout(app: web.Application) -> float:
    """How long each resource of `app` may take to stop (see SHUTDOWN_TIMEOUT)."""
    return app.get(SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT_SECONDS)


def database_context(settings: DatabaseSettings) -> CleanupContext:
    """The pool, reset between uses only if the service leaves session state on its
    connections (`db_session_state` in its settings)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        database = await Database.connect(settings, session_state=settings.db_session_state)
        app[DATABASE] = database
        app[SHUTDOWN_TIMEOUT] = settings.shutdown_timeout_seconds
        yield
        await database.close(settings.shutdown_timeout_seconds)

    return context


def broker_context(
    settings: BrokerSettings, *, name: str, topology: Topology | None = None
) -> CleanupContext:
    async def context(app: web.Application) -> AsyncIterator[None]:
        broker = await Broker.connect(settings, name=name, topology=topology)
        app[BROKER] = broker
        app[SHUTDOWN_TIMEOUT] = settings.shutdown_timeout_seconds
        yield
        await bounded(broker.close(), settings.shutdown_timeout_seconds, "close broker connection")

    return context


def provider_client_context(settings: ProviderClientSettings) -> CleanupContext:
    async def context(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession()
        app[PROVIDER] = ProviderClient(
            session, settings.provider_url, timeout_seconds=settings.provider_timeout_seconds
        )
        yield
        await bounded(session.close(), settings.shutdown_timeout_seconds, "close provider client")

    return context


def consumer_context(
    queue: Callable[[Topology], QueueSpec],
    payload_type: type[P],
    make_handler: Callable[[web.Application], Handler[P]],
    *,
    make_batch_handler: Callable[[web.Application], BatchHandler[P]] | None = None,
    batches_in_flight: int = 4,
) -> CleanupContext:
    """Consume `queue` with the handlers built from the app's resources (see Consumer)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        broker = app[BROKER]
        consumer = Consumer(
            broker,
            queue(broker.topology),
            payload_type,
            make_handler(app),
            batch_handler=make_batch_handler(app) if make_batch_handler else None,
            batches_in_flight=batches_in_flight,
        )
        await consumer.start()
        yield
        await consumer.stop(grace_seconds=shutdown_timeout(app))

    return context


# After a failed round (say the database is restarting), wait longer each time, up to this.
MAX_ERROR_BACKOFF_SECONDS = 5.0


def background_context(
    key: web.AppKey[asyncio.Task[None]],
    name: str,
    round_of_work: Callable[[], Awaitable[int]],
    *,
    batch_size: int,
    interval: float,
    wake: asyncio.Event | None = None,
) -> CleanupContext:
    """Run `round_of_work` every `interval` seconds while the app runs, and as soon as
    `wake` is set (by whoever knows that work is due): the interval is then only the
    fallback for work it cannot know of (another replica's, or a restart's)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(
            _repeat(name, round_of_work, batch_size=batch_size, interval=interval, wake=wake),
            name=name,
        )
        app[key] = task
        yield
        await stop_task(task, shutdown_timeout(app), name)

    return context


async def _repeat(
    name: str,
    round_of_work: Callable[[], Awaitable[int]],
    *,
    batch_size: int,
    interval: float,
    wake: asyncio.Event | None,
) -> None:
    failures = 0
    while True:
        if wake is not None:
            # Cleared before the round: a wake-up during it starts the next one at once.
            wake.clear()
        try:
            done = await round_of_work()
        except Exception:
            failures += 1
            delay = Backoff(2 * interval, MAX_ERROR_BACKOFF_SECONDS).delay(failures)
            log.exception(
                "background work failed, trying again", extra={"task": name, "retry_in_s": delay}
            )
            await asyncio.sleep(delay)
            continue
        failures = 0
        if done >= batch_size:
            await asyncio.sleep(0)  # a full batch means more is due already: no pause
        elif wake is None:
            await asyncio.sleep(interval)
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await wake.wait()


async def freeze_heap(_: web.Application) -> None:
    """Keep what the started service holds for good out of every later garbage collection.

    A full collection walks every tracked object, and the modules, settings, pool and
    broker connections of a started service are many: under load the collector walked
    them all every few seconds, pausing the process long enough to be the gateway's p99
    (docs/decisions/0001-performance.md). Frozen, they are skipped; what requests
    allocate is still collected as before.
    """
    gc.collect()
    gc.freeze()


def main(settings_class: type[S], create_app: Callable[[S], web.Application]) -> None:
    """Every service's entry point: settings from the environment (or a readable refusal),
    JSON logs, then `create_app(settings)` served until SIGTERM."""
    settings = load_settings(settings_class)
    configure_logging(settings_class.service_name, settings.log_level)
    run(create_app(settings), settings)


def run(app: web.Application, settings: BaseServiceSettings) -> None:
    """Serve `app` until SIGTERM or SIGINT, then shut down cleanly."""
    # After the cleanup contexts' startup (aiohttp runs them first), so pools and
    # connections are frozen with the rest.
    app.on_startup.append(freeze_heap)
    log.info(
        "starting",
        extra={"host": settings.host, "port": settings.port, "env": settings.app_env.value},
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        access_log=None,
        print=None,
        # libuv's event loop: the same asyncio semantics, less CPU per request and message.
        loop=uvloop.new_event_loop(),
    )
    log.info("stopped")
