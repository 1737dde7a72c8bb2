"""POST /api/webhooks: signatures over raw bytes, both schemes, and nothing let through."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from libs.common.broker.connection import Broker
from libs.common.db import Database
from libs.common.messages import Envelope, WebhookReceived, decode
from libs.common.signing import seed_signature, signature_headers, standard_signature
from libs.common.webhook_events import event_uuid
from services.gateway.webhooks import receive_webhook
from tests.integration.conftest import MakeGateway
from tests.integration.gateway_client import Answer, Gateway

SECRET = "webhook-secret-key"
ROTATED = ["whsec_" + base64.b64encode(b"the new secret").decode(), SECRET]


def seed_payload(payment_id: str = "6c0e1f1e-9d53-4c4e-9a53-0f2b5f4f7d11") -> bytes:
    # Exactly the seed's payload.json as its heredoc writes it, stray "1" and newline included.
    return (
        '{"event_type":"payment.completed","payment_id":"' + payment_id + '",'
        '"provider":"test_provider","data":{"reference":"PAY-0000000001"}}1\n'
    ).encode()


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> AsyncIterator[Gateway]:
    async with make_gateway(webhook_secret=",".join(ROTATED)) as gateway:
        yield gateway


async def published(broker: Broker) -> list[WebhookReceived]:
    messages = []
    async with broker.connection.channel() as channel:
        queue = await channel.get_queue(broker.topology.webhook_received.name)
        while (message := await queue.get(fail=False)) is not None:
            messages.append(decode(message.body, WebhookReceived).payload)
            await message.ack()
    return messages


def failures(reason: str) -> float:
    value = REGISTRY.get_sample_value("webhook_signature_failures_total", {"reason": reason})
    return value or 0.0


async def send(gateway: Gateway, body: bytes, headers: dict[str, str]) -> Answer:
    return await gateway.call(
        "POST",
        "/api/webhooks",
        data=body,
        headers={"Content-Type": "application/json", **headers},
    )


async def test_seed_signature_over_the_exact_file_is_accepted(
    gateway: Gateway, broker: Broker
) -> None:
    body = seed_payload()
    answer = await send(gateway, body, {"X-Webhook-Signature": seed_signature(body, SECRET)})

    assert answer.status == 202
    assert answer.body["received"] is True
    assert answer.body["scheme"] == "seed"
    assert answer.body["already_stored"] is False
    [event] = await published(broker)
    assert event.raw_body == body
    assert event.signature_scheme == "seed"
    assert answer.body["event_id"] == str(
        event_uuid("test_provider", "sha256:" + hashlib.sha256(body).hexdigest())
    )


async def test_sha256_prefix_and_upper_case_hex_are_accepted(gateway: Gateway) -> None:
    body = seed_payload()
    signature = "sha256=" + seed_signature(body, SECRET).upper()
    answer = await send(gateway, body, {"X-Webhook-Signature": signature})
    assert answer.status == 202


async def test_standard_webhooks_signed_with_the_new_secret(
    gateway: Gateway, broker: Broker
) -> None:
    body = json.dumps(
        {"event_id": "evt_1", "event_type": "payment.failed", "payment_id": str(uuid.uuid4())}
    ).encode()
    headers = signature_headers(body, ROTATED, message_id="msg_1")
    del headers["X-Webhook-Signature"]
    answer = await send(gateway, body, headers)
    assert answer.status == 202
    assert answer.body["scheme"] == "standard"
    [event] = await published(broker)
    assert event.headers["webhook-id"] == "msg_1"


async def test_several_signatures_one_valid(gateway: Gateway) -> None:
    body = b'{"event_type":"payment.completed","payment_id":"x"}'
    now = int(time.time())
    good = standard_signature("msg_2", now, body, SECRET)
    headers = {
        "webhook-id": "msg_2",
        "webhook-timestamp": str(now),
        "webhook-signature": f"v1,{base64.b64encode(b'x' * 32).decode()} {good}",
    }
    assert (await send(gateway, body, headers)).status == 202


def _changed_byte(body: bytes) -> bytes:
    return body[:10] + bytes([body[10] ^ 1]) + body[11:]


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("changed byte", "signature_invalid"),
        ("wrong secret", "signature_invalid"),
        ("missing header", "signature_missing"),
        ("curl -d strips the newline", "signature_invalid"),
        ("standard: 301 s old", "signature_timestamp_out_of_tolerance"),
        ("standard: 301 s ahead", "signature_timestamp_out_of_tolerance"),
        ("standard: missing id", "signature_missing"),
        ("standard: not a number", "signature_timestamp_invalid"),
        ("standard: wrong secret", "signature_invalid"),
    ],
)
async def test_bad_signatures_are_refused_counted_and_not_published(
    gateway: Gateway, broker: Broker, case: str, code: str
) -> None:
    body = seed_payload()
    now = int(time.time())
    sent, headers = body, {"X-Webhook-Signature": seed_signature(body, SECRET)}
    if case == "changed byte":
        sent = _changed_byte(body)
    elif case == "wrong secret":
        headers = {"X-Webhook-Signature": seed_signature(body, "not-the-secret")}
    elif case == "missing header":
        headers = {}
    elif case == "curl -d strips the newline":
        sent = body.rstrip(b"\n")
    elif case.startswith("standard"):
        stamp = {"standard: 301 s old": now - 301, "standard: 301 s ahead": now + 301}.get(
            case, now
        )
        secret = "not-the-secret" if case == "standard: wrong secret" else SECRET
        headers = {
            "webhook-id": "msg_3",
            "webhook-timestamp": "soon" if case == "standard: not a number" else str(stamp),
            "webhook-signature": standard_signature("msg_3", stamp, body, secret),
        }
        if case == "standard: missing id":
            del headers["webhook-id"]
    before = failures(code)

    answer = await send(gateway, sent, headers)

    assert answer.status == 401
    assert answer.body["error"] == code
    assert failures(code) == before + 1
    assert await published(broker) == []


async def test_timestamps_within_tolerance_are_accepted(gateway: Gateway) -> None:
    body = seed_payload()
    for offset in (-299, 299):
        stamp = int(time.time()) + offset
        headers = {
            "webhook-id": f"msg_{offset}",
            "webhook-timestamp": str(stamp),
            "webhook-signature": standard_signature(f"msg_{offset}", stamp, body, SECRET),
        }
        assert (await send(gateway, body, headers)).status == 202


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"payment_id": "x"}', b'{"event_type": 5, "payment_id": "x"}'],
)
async def test_verified_body_that_is_not_an_event_is_400(
    gateway: Gateway, broker: Broker, body: bytes
) -> None:
    answer = await send(gateway, body, {"X-Webhook-Signature": seed_signature(body, SECRET)})
    assert answer.status == 400
    assert answer.body["error"] == "invalid_webhook"
    assert await published(broker) == []


async def test_unsigned_garbage_is_401_before_it_is_parsed(gateway: Gateway) -> None:
    answer = await send(gateway, b"\xff\xfe not even utf-8", {})
    assert (answer.status, answer.body["error"]) == (401, "signature_missing")


async def test_body_over_256_kib_is_413(gateway: Gateway, broker: Broker) -> None:
    body = b'{"event_type":"payment.completed","payment_id":"x","pad":"' + b"x" * 262_144 + b'"}'
    answer = await send(gateway, body, {"X-Webhook-Signature": seed_signature(body, SECRET)})
    assert (answer.status, answer.body["error"]) == (413, "payload_too_large")
    assert await published(broker) == []


async def test_unknown_event_lookup(gateway: Gateway) -> None:
    missing = await gateway.call("GET", f"/api/webhooks/{uuid.uuid4()}")
    assert (missing.status, missing.body["error"]) == (404, "event_not_found")
    malformed = await gateway.call("GET", "/api/webhooks/evt_1")
    assert (malformed.status, malformed.body["error"]) == (400, "invalid_event_id")


async def test_a_first_copy_stored_as_soon_as_published_is_not_called_a_duplicate(
    db: Database,
) -> None:
    """The webhooks service may store the event the moment the broker has it; the answer
    to the request that brought it must still say it is new."""
    body = seed_payload(str(uuid.uuid4()))
    event_id = event_uuid("test_provider", "sha256:" + hashlib.sha256(body).hexdigest())

    async def publish_and_store_at_once(envelope: Envelope[Any]) -> None:
        async with db.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO webhooks.webhook_events (id, provider, provider_event_id, raw_body,"
                " signature_scheme, received_at, verified_at)"
                " VALUES ($1, 'test_provider', $2, $3, 'seed', now(), now())",
                event_id,
                f"sha256:{hashlib.sha256(body).hexdigest()}",
                body,
            )

    answer = await receive_webhook(
        body,
        {"X-Webhook-Signature": seed_signature(body, SECRET)},
        secrets=[SECRET],
        publish=publish_and_store_at_once,
        db=db,
    )
    assert answer["event_id"] == str(event_id)
    assert answer["already_stored"] is False
