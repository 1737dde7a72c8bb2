"""Every route that takes a body, fed deep, wide and malformed bodies: a 4xx, never a 5xx.

The routes are found, not listed: the gateway's from its OpenAPI document (every
operation with a request body), the simulated provider's from its router (every POST,
PUT and PATCH), so a route added later is covered without touching this file. Each
request carries what lets the body be read at all (a correct webhook signature, an
Idempotency-Key, JSON's content type), so it is the body that is refused. Afterwards no
table has a row more and no queue a message.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from libs.common.broker.connection import Broker
from libs.common.json_body import MAX_DEPTH
from libs.common.settings import ProviderSettings
from libs.common.signing import seed_signature
from services.provider.app import create_app as create_provider
from tests.integration.conftest import MakeGateway
from tests.integration.gateway_client import Gateway
from tests.integration.test_broker import queue_depth
from tests.openapi import DOCUMENT

SECRET = "a-test-webhook-secret"
_PARAMETER = re.compile(r"\{[^}/]+\}")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def gateway_routes() -> list[tuple[str, str]]:
    return [
        (method.upper(), template)
        for template, operations in DOCUMENT["paths"].items()
        for method, operation in operations.items()
        if "requestBody" in operation
    ]


def provider_routes() -> list[tuple[str, str]]:
    app = create_provider(ProviderSettings())
    return sorted(
        {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.method in _BODY_METHODS and route.resource is not None
        }
    )


def test_the_routes_are_found() -> None:
    assert ("POST", "/api/payments/pay") in gateway_routes()
    assert ("POST", "/api/webhooks") in gateway_routes()
    assert ("POST", "/charges") in provider_routes()


# --- hostile bodies ----------------------------------------------------------------------------
# None of them is a valid request for any route (no required field set, or not JSON at all),
# so whatever route reads one must refuse it.


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(MAX_DEPTH + 1, 5000))
    openers = draw(st.lists(st.sampled_from([b"[", b'{"k":']), min_size=1, max_size=3))
    opened = [openers[i % len(openers)] for i in range(depth)]
    nested = b"".join(opened) + b"0" + b"".join(b"]" if o == b"[" else b"}" for o in opened[::-1])
    where = draw(
        st.sampled_from(
            [
                b"%s",
                b'{"metadata": %s}',
                b'{"amount": 10, "customer_id": "c", "metadata": {"k": %s}}',
                # A valid event but for its data: the signed webhook that gave a 500.
                b'{"event_type": "payment.completed", "payment_id": "p", "data": %s}',
            ]
        )
    )
    return where.replace(b"%s", nested)


@st.composite
def wide(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(21, 30_000))
    if draw(st.booleans()):
        return json.dumps({f"k{i}": i for i in range(count)}).encode()
    return json.dumps([{}] * count).encode()


_huge = st.sampled_from(
    [
        b"9" * 5000,
        b"-" + b"9" * 5000,
        b"1e999999999",
        b"1e-999999999",
        b"1E+99999999999999999999",
        b"0." + b"0" * 5000 + b"1",
        b"10.0000000000000000000000000000001",
    ]
)


@st.composite
def huge_numbers(draw: st.DrawFn) -> bytes:
    number = draw(_huge)
    field = draw(st.sampled_from([b"amount", b"amount_minor", b"n"]))
    return b'{"' + field + b'": ' + number + b', "customer_id": "c"}'


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
wrong_top_level = st.one_of(
    st.lists(_values), st.text(), st.integers(), st.floats(allow_nan=False), st.none()
).map(lambda value: json.dumps(value).encode())

_valid_pay = b'{"amount": 10, "customer_id": "c1", "description": "a caf\xc3\xa9"}'
invalid_utf8 = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"]).map(
    lambda bad: _valid_pay.replace(b"caf\xc3\xa9", b"caf" + bad)
)
truncated = st.integers(0, len(_valid_pay) - 1).map(lambda end: _valid_pay[:end])
# Random bytes are not an event, a payment or a charge (none has its required fields).
garbage = st.binary(max_size=2000)

hostile_bodies = st.one_of(
    deep(), wide(), huge_numbers(), wrong_top_level, invalid_utf8, truncated, garbage
)


# --- the routes, running ----------------------------------------------------------------------


@dataclasses.dataclass
class Refusal:
    route: str
    status: int
    body: Any


Send = Callable[[str, str, bytes], Awaitable[Refusal]]


def _path(template: str) -> str:
    return _PARAMETER.sub(lambda _: str(uuid.uuid4()), template)


def _headers(raw: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Idempotency-Key": f"key-{uuid.uuid4()}",
        "X-Webhook-Signature": seed_signature(raw, SECRET),
    }


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> AsyncIterator[Gateway]:
    async with make_gateway(webhook_secret=SECRET, rate_limit="100000/second") as gateway:
        yield gateway


@pytest.fixture
async def provider(database_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_provider(
        ProviderSettings(database_url=database_url, provider_error_rate=0.0, provider_seed=1)
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def routes(gateway: Gateway, provider: TestClient[Any, Any]) -> list[tuple[str, str, Send]]:
    async def to_gateway(method: str, template: str, raw: bytes) -> Refusal:
        # Gateway.call also holds the answer against the OpenAPI document.
        answer = await gateway.call(method, _path(template), data=raw, headers=_headers(raw))
        return Refusal(f"gateway {method} {template}", answer.status, answer.body)

    async def to_provider(method: str, template: str, raw: bytes) -> Refusal:
        async with provider.request(
            method, _path(template), data=raw, headers=_headers(raw)
        ) as response:
            assert response.content_type == "application/json", await response.text()
            body = await response.json()
        return Refusal(f"provider {method} {template}", response.status, body)

    return [(m, t, to_gateway) for m, t in gateway_routes()] + [
        (m, t, to_provider) for m, t in provider_routes()
    ]


async def stored_rows(database_url: str) -> dict[str, int]:
    """Rows in every table of the database (every service's schema)."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch(
            "SELECT format('%I.%I', table_schema, table_name) AS name"
            "  FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE'"
            "   AND table_schema NOT IN ('pg_catalog', 'information_schema', 'public')"
        )
        return {
            row["name"]: await conn.fetchval(
                f"SELECT count(*) FROM {row['name']}"
            )  # names from the catalog
            for row in tables
        }
    finally:
        await conn.close()


async def queued_messages(broker: Broker) -> dict[str, int]:
    depths = {}
    for spec in broker.topology.queues:
        for name in (spec.name, spec.parking):
            depths[name] = await queue_depth(broker, name)
    return depths


def assert_refused(refusal: Refusal, raw: bytes) -> None:
    shown = f"{refusal.route} answered {refusal.status} {refusal.body!r} to {raw[:200]!r}"
    assert 400 <= refusal.status < 500, shown
    assert isinstance(refusal.body, dict), shown
    assert isinstance(refusal.body.get("error"), str), shown
    assert refusal.body["error"], shown
    assert isinstance(refusal.body.get("message"), str), shown
    assert refusal.body["message"], shown


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=hostile_bodies)
# Each of these gave a 500 before: always tried, whatever is drawn.
@example(
    raw=b'{"amount": 10, "customer_id": "c", "metadata": {"k": ' + b"[" * 1000 + b"]" * 1000 + b"}}"
)
@example(
    raw=b'{"event_type": "payment.completed", "payment_id": "p", "data": '
    + b"[" * 3000
    + b"]" * 3000
    + b"}"
)
@example(raw=b'{"amount": 1E+99999999999999999999, "customer_id": "c"}')
@example(raw=b'{"amount": 1e999999999, "customer_id": "c"}')
@example(raw=b'{"amount": "1e-999999999", "customer_id": "c"}')
@example(raw=b'{"n": ' + b"9" * 5000 + b"}")
async def test_every_route_refuses_hostile_bodies_with_a_4xx_and_stores_nothing(
    routes: list[tuple[str, str, Send]], broker: Broker, database_url: str, raw: bytes
) -> None:
    rows_before = await stored_rows(database_url)
    for method, template, send in routes:
        assert_refused(await send(method, template, raw), raw)
    assert await stored_rows(database_url) == rows_before
    assert set((await queued_messages(broker)).values()) == {0}


# --- the two bodies that gave a 500 ---------------------------------------------------------


def nested_list(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100, 1000, 10_000])
async def test_pay_with_deeply_nested_metadata_is_400(
    gateway: Gateway, broker: Broker, depth: int
) -> None:
    raw = b'{"amount": 10, "customer_id": "c", "metadata": {"k": ' + nested_list(depth) + b"}}"
    answer = await gateway.pay(raw=raw)
    assert (answer.status, answer.body["error"]) == (400, "too_deeply_nested"), answer.body
    assert str(MAX_DEPTH) in answer.body["message"]
    assert set((await queued_messages(broker)).values()) == {0}


async def test_pay_nested_to_the_limit_reaches_validation(gateway: Gateway) -> None:
    inner = nested_list(MAX_DEPTH - 2)  # the body and metadata are two levels
    answer = await gateway.pay(
        raw=b'{"amount": 10, "customer_id": "c", "metadata": {"k": ' + inner + b"}}"
    )
    assert (answer.status, answer.body["error"]) == (422, "invalid_metadata"), answer.body


@pytest.mark.parametrize("depth", [100, 3000])
async def test_signed_webhook_with_deeply_nested_data_is_400(
    gateway: Gateway, broker: Broker, depth: int
) -> None:
    raw = (
        b'{"event_type": "payment.completed", "payment_id": "p", "data": '
        + nested_list(depth)
        + b"}"
    )
    answer = await gateway.call(
        "POST",
        "/api/webhooks",
        data=raw,
        headers={"X-Webhook-Signature": seed_signature(raw, SECRET)},
    )
    assert (answer.status, answer.body["error"]) == (400, "invalid_webhook"), answer.body
    assert "nests" in answer.body["message"]
    assert set((await queued_messages(broker)).values()) == {0}


async def test_unsigned_deep_webhook_is_still_401_before_any_parsing(gateway: Gateway) -> None:
    answer = await gateway.call("POST", "/api/webhooks", data=nested_list(100_000))
    assert (answer.status, answer.body["error"]) == (401, "signature_missing")


# --- JSON in a query: the list's cursor --------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/payments", "/api/events"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 3000])
async def test_a_deeply_nested_cursor_is_400(gateway: Gateway, path: str, depth: int) -> None:
    """A cursor is base64 JSON the client hands back; 3,000 levels fit in a URL and
    used to end in a RecursionError (500)."""
    cursor = base64.urlsafe_b64encode(nested_list(depth)).decode().rstrip("=")
    answer = await gateway.call("GET", f"{path}?cursor={cursor}")
    assert (answer.status, answer.body["error"]) == (400, "invalid_cursor")
