"""API keys and rate limits at the gateway."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from libs.common.signing import seed_signature
from tests.integration.conftest import MakeGateway
from tests.integration.gateway_client import Gateway

KEYS = ["key-alpha-7f3c", "key-beta-91ad"]
ORDER = {"amount": "10.00", "customer_id": "c1"}


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> AsyncIterator[Gateway]:
    async with make_gateway(api_keys=",".join(KEYS), api_secret="seed-style-secret") as gateway:
        yield gateway


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "api_key_missing"),
        ({"Authorization": "Basic a2V5OnNlY3JldA=="}, "api_key_missing"),
        ({"Authorization": "Bearer "}, "api_key_missing"),
        (bearer("key-alpha-7f3"), "api_key_invalid"),
        (bearer("key-alpha-7f3cX"), "api_key_invalid"),
        (bearer("revoked-key-0000"), "api_key_invalid"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/payments/pay"),
        ("GET", "/api/payments"),
        ("GET", "/api/payments/stats"),
        ("GET", f"/api/payments/{uuid.UUID(int=1)}"),
        ("POST", "/api/reconciliations"),
        ("GET", "/api/reconciliations"),
    ],
)
async def test_api_routes_need_a_valid_key(
    gateway: Gateway, method: str, path: str, headers: dict[str, str], code: str
) -> None:
    kwargs: dict[str, Any] = {"headers": {"Content-Type": "application/json", **headers}}
    if method == "POST":
        kwargs["data"] = b'{"amount": "10.00", "customer_id": "c1"}'
    answer = await gateway.call(method, path, **kwargs)
    assert answer.status == 401
    assert answer.body["error"] == code
    assert answer.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("key", [*KEYS, "seed-style-secret"])
async def test_every_configured_key_is_accepted(gateway: Gateway, key: str) -> None:
    assert (await gateway.pay(ORDER, headers=bearer(key))).status == 202
    assert (await gateway.call("GET", "/api/payments", headers=bearer(key))).status == 200


async def test_probes_and_the_document_stay_open(gateway: Gateway) -> None:
    for path in ("/health", "/api/openapi.json", "/metrics"):
        assert (await gateway.call("GET", path)).status == 200


async def test_webhooks_authenticate_by_signature_only(gateway: Gateway) -> None:
    body = b'{"event_type":"payment.completed","payment_id":"x"}'
    answer = await gateway.call(
        "POST",
        "/api/webhooks",
        data=body,
        headers={"X-Webhook-Signature": seed_signature(body, "webhook-secret-key")},
    )
    assert answer.status == 202


async def test_idempotency_keys_belong_to_their_api_key(gateway: Gateway) -> None:
    same = {"Idempotency-Key": "order-1"}
    first = await gateway.pay(ORDER, headers={**bearer(KEYS[0]), **same})
    other = await gateway.pay(ORDER, headers={**bearer(KEYS[1]), **same})
    again = await gateway.pay(ORDER, headers={**bearer(KEYS[0]), **same})
    assert first.status == other.status == again.status == 202
    assert other.body["id"] != first.body["id"]
    assert again.body["id"] == first.body["id"]


async def test_rate_limit_answers_429_with_retry_after(make_gateway: MakeGateway) -> None:
    async with make_gateway(api_keys=",".join(KEYS), rate_limit="3/minute") as gateway:
        answers = [await gateway.pay(ORDER, headers=bearer(KEYS[0])) for _ in range(4)]
        assert [a.status for a in answers] == [202, 202, 202, 429]
        limited = answers[-1]
        assert limited.body["error"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        # Another key has its own allowance.
        assert (await gateway.pay(ORDER, headers=bearer(KEYS[1]))).status == 202


async def test_without_keys_the_limit_is_per_address(make_gateway: MakeGateway) -> None:
    async with make_gateway(rate_limit="2/minute") as gateway:
        statuses = [(await gateway.pay(ORDER)).status for _ in range(3)]
        assert statuses == [202, 202, 429]


async def test_repeated_signature_failures_shut_the_address_out(make_gateway: MakeGateway) -> None:
    async with make_gateway(webhook_failure_limit="3/minute") as gateway:
        body = b'{"event_type":"payment.completed","payment_id":"x"}'
        bad = {"X-Webhook-Signature": "0" * 64}
        good = {"X-Webhook-Signature": seed_signature(body, "webhook-secret-key")}
        statuses = [
            (await gateway.call("POST", "/api/webhooks", data=body, headers=bad)).status
            for _ in range(3)
        ]
        assert statuses == [401, 401, 401]
        refused = await gateway.call("POST", "/api/webhooks", data=body, headers=good)
        assert refused.status == 429
        assert refused.body["error"] == "too_many_signature_failures"
        assert int(refused.headers["Retry-After"]) >= 1
