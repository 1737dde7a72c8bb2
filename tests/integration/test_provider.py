"""The simulated PSP against a real database and a real webhook receiver.

The provider runs in-process (aiohttp's TestServer); its webhooks go over real HTTP to a
small receiver on 127.0.0.1 that records every request and can be told to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from prometheus_client import REGISTRY

from libs.common.db import Database
from libs.common.settings import ProviderSettings
from libs.common.signing import SEED_HEADER, Scheme, verify
from services.provider import app as provider_app
from services.provider import deliveries as deliveries_module
from services.provider.app import create_app
from services.provider.charges import ChargeRequest, create_charge, settle_due
from services.provider.deliveries import RetryPolicy, WebhookTarget, deliver_due
from services.provider.simulation import Simulation
from tests.support import eventually, free_port

SECRETS = ["provider-test-secret", "previous-secret"]
CHARGE_ID = re.compile(r"^ch_[0-9a-f]{24}$")
EVENT_ID = re.compile(r"^evt_[0-9a-f]{24}$")
CHARGE_FIELDS = [
    "id",
    "payment_id",
    "reference",
    "amount_minor",
    "currency",
    "customer_id",
    "status",
    "decline_reason",
    "created_at",
    "settled_at",
]

Client = TestClient[web.Request, web.Application]


# --- the webhook receiver -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Received:
    body: bytes
    headers: CIMultiDict[str]
    at: float


@dataclasses.dataclass
class Receiver:
    url: str = ""
    requests: list[Received] = dataclasses.field(default_factory=list)
    # Answer 500 to this many requests before accepting.
    failures_left: int = 0
    # Hold each answer this long (to widen race windows).
    delay: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Received(await request.read(), CIMultiDict(request.headers), time.monotonic())
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures_left > 0:
            self.failures_left -= 1
            return web.Response(status=500, text="receiver not ready")
        return web.json_response({"received": True})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/webhooks", state.handle)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    state.url = str(server.make_url("/webhooks"))
    try:
        yield state
    finally:
        await server.close()


# --- the provider ---------------------------------------------------------------------------

MakeSettings = Callable[..., ProviderSettings]


@pytest.fixture
def make_settings(database_url: str, receiver: Receiver) -> MakeSettings:
    def make(**overrides: Any) -> ProviderSettings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "webhook_secret": SECRETS,
            "provider_webhook_url": receiver.url,
            "provider_webhook_delay_ms": 50,
            "provider_decline_rate": 0.0,
            "provider_webhook_drop_rate": 0.0,
            "provider_webhook_duplicate_rate": 0.0,
            "provider_error_rate": 0.0,
            "provider_seed": 7,
        }
        return ProviderSettings(**(values | overrides))

    return make


@contextlib.asynccontextmanager
async def running(settings: ProviderSettings) -> AsyncIterator[Client]:
    client: Client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def provider(make_settings: MakeSettings) -> AsyncIterator[Client]:
    async with running(make_settings()) as client:
        yield client


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await Database.connect(ProviderSettings(database_url=database_url))
    try:
        yield database
    finally:
        await database.close()


def charge_body(**changes: Any) -> dict[str, Any]:
    payment_id = uuid.uuid4()
    body: dict[str, Any] = {
        "payment_id": str(payment_id),
        "reference": f"PAY-{payment_id.hex[:10]}",
        "amount_minor": 10000,
        "currency": "USD",
        "customer_id": "test_customer",
    }
    return body | changes


async def post_charge(
    client: Client, body: Any, key: str | None = "auto"
) -> aiohttp.ClientResponse:
    headers = {}
    if key is not None:
        headers["Idempotency-Key"] = str(uuid.uuid4()) if key == "auto" else key
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post("/charges", data=data, headers=headers)


async def create(client: Client, **changes: Any) -> dict[str, Any]:
    response = await post_charge(client, charge_body(**changes))
    assert response.status == 201, await response.text()
    charge: dict[str, Any] = await response.json()
    return charge


async def fetch(client: Client, charge_id: str) -> dict[str, Any]:
    response = await client.get(f"/charges/{charge_id}")
    assert response.status == 200, await response.text()
    charge: dict[str, Any] = await response.json()
    return charge


async def deliveries(db: Database, charge_id: str | None = None) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT * FROM provider.webhook_deliveries"
        " WHERE $1::text IS NULL OR charge_id = $1 ORDER BY created_at, id",
        charge_id,
    )
    return [dict(row) for row in rows]


async def drained(db: Database) -> bool:
    """Whether the delivery loop has nothing left to do: every delivery is final."""
    return all(d["state"] != "pending" for d in await deliveries(db))


async def settled(client: Client, charge_id: str) -> dict[str, Any] | None:
    charge = await fetch(client, charge_id)
    return None if charge["status"] == "processing" else charge


async def count_charges(db: Database) -> int:
    row = await db.fetchrow("SELECT count(*) AS n FROM provider.charges")
    assert row is not None
    n: int = row["n"]
    return n


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- creating charges -----------------------------------------------------------------------


async def test_create_answers_201_with_the_processing_charge(provider: Client) -> None:
    body = charge_body()
    before = counter("provider_charges_total", outcome="accepted")

    response = await post_charge(provider, body)

    assert response.status == 201
    charge = await response.json()
    assert list(charge) == CHARGE_FIELDS
    assert CHARGE_ID.match(charge["id"])
    assert {k: charge[k] for k in body} == body
    assert charge["status"] == "processing"
    assert charge["decline_reason"] is None
    assert charge["settled_at"] is None
    assert dt.datetime.fromisoformat(charge["created_at"]).tzinfo is not None
    assert response.headers["Location"] == f"/charges/{charge['id']}"
    assert "Idempotent-Replayed" not in response.headers
    assert counter("provider_charges_total", outcome="accepted") == before + 1


async def test_same_key_and_body_replays_the_same_charge(provider: Client, db: Database) -> None:
    body = charge_body()
    first = await post_charge(provider, body, key="key-1")
    # The same request spelled differently (key order, spacing) is still the same request.
    respelled = json.dumps(dict(reversed(body.items())), indent=2).encode()
    again = await post_charge(provider, respelled, key="key-1")

    assert first.status == 201
    assert again.status == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == await first.json()
    assert await count_charges(db) == 1


async def test_same_key_with_another_body_is_refused(provider: Client, db: Database) -> None:
    body = charge_body()
    assert (await post_charge(provider, body, key="key-2")).status == 201

    response = await post_charge(provider, body | {"amount_minor": 10001}, key="key-2")

    assert response.status == 422
    assert (await response.json())["error"] == "idempotency_key_reused"
    [row] = await db.fetch("SELECT amount_minor FROM provider.charges")
    assert row["amount_minor"] == 10000


async def test_concurrent_identical_requests_create_one_charge(
    provider: Client, db: Database
) -> None:
    body = charge_body()

    responses = await asyncio.gather(*(post_charge(provider, body, key="race") for _ in range(30)))

    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 29 + [201]
    ids = {(await r.json())["id"] for r in responses}
    assert len(ids) == 1
    assert await count_charges(db) == 1


@pytest.mark.parametrize(
    ("key", "code"),
    [
        (None, "idempotency_key_missing"),
        ("", "idempotency_key_invalid"),
        ("k" * 256, "idempotency_key_invalid"),
        ("tab\tkey", "idempotency_key_invalid"),
        ("clé", "idempotency_key_invalid"),
    ],
    ids=["missing", "empty", "too-long", "control-char", "non-ascii"],
)
async def test_idempotency_key_must_be_printable_ascii(
    provider: Client, db: Database, key: str | None, code: str
) -> None:
    response = await post_charge(provider, charge_body(), key=key)

    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == code
    assert answer["message"]
    assert await count_charges(db) == 0


async def test_the_longest_idempotency_key_is_accepted(provider: Client) -> None:
    assert (await post_charge(provider, charge_body(), key="k" * 255)).status == 201


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[]", "validation_error"),
        (charge_body(extra="field"), "validation_error"),
        (charge_body(amount_minor="10000"), "validation_error"),
        (charge_body(amount_minor=100.0), "validation_error"),
        (charge_body(amount_minor=True), "validation_error"),
        (charge_body(amount_minor=0), "validation_error"),
        (charge_body(amount_minor=-5), "validation_error"),
        (charge_body(amount_minor=2**63), "validation_error"),
        (charge_body(currency="usd"), "validation_error"),
        (charge_body(currency="USDT"), "validation_error"),
        (charge_body(reference=""), "validation_error"),
        (charge_body(reference="R" * 65), "validation_error"),
        (charge_body(reference="nul\x00"), "validation_error"),
        (charge_body(customer_id=""), "validation_error"),
        (charge_body(customer_id="c" * 129), "validation_error"),
        (charge_body(payment_id="not-a-uuid"), "validation_error"),
        (charge_body(payment_id=None), "validation_error"),
        ({k: v for k, v in charge_body().items() if k != "currency"}, "validation_error"),
    ],
    ids=[
        "bad-json",
        "empty-body",
        "not-an-object",
        "unknown-field",
        "amount-as-string",
        "amount-as-float",
        "amount-as-bool",
        "amount-zero",
        "amount-negative",
        "amount-past-bigint",
        "currency-lowercase",
        "currency-4-letters",
        "reference-empty",
        "reference-too-long",
        "reference-with-nul",
        "customer-empty",
        "customer-too-long",
        "payment-id-not-uuid",
        "payment-id-null",
        "field-missing",
    ],
)
async def test_invalid_bodies_are_refused_with_a_code(
    provider: Client, db: Database, body: Any, code: str
) -> None:
    response = await post_charge(provider, body)

    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == code
    assert answer["message"]
    assert await count_charges(db) == 0


async def test_validation_errors_name_every_field(provider: Client) -> None:
    response = await post_charge(provider, charge_body(currency="usd", unknown=1))
    answer = await response.json()
    assert "currency" in answer["message"]
    assert "unknown" in answer["message"]
    assert {d["field"]: d["code"] for d in answer["details"]} == {
        "currency": "string_pattern_mismatch",
        "unknown": "extra_forbidden",
    }


async def test_edge_values_are_accepted(provider: Client) -> None:
    charge = await create(
        provider, reference="R" * 64, customer_id="ü" * 128, amount_minor=2**63 - 1
    )
    assert charge["amount_minor"] == 2**63 - 1
    assert charge["customer_id"] == "ü" * 128


# --- reading charges ------------------------------------------------------------------------


async def test_get_by_id(provider: Client) -> None:
    charge = await create(provider)
    assert await fetch(provider, charge["id"]) == charge


@pytest.mark.parametrize("charge_id", ["ch_000000000000000000000000", "nothing-like-an-id"])
async def test_get_unknown_charge_is_404(provider: Client, charge_id: str) -> None:
    response = await provider.get(f"/charges/{charge_id}")
    assert response.status == 404
    assert (await response.json())["error"] == "charge_not_found"


async def test_lookup_by_payment_id_lists_oldest_first(provider: Client) -> None:
    payment_id = str(uuid.uuid4())
    first = await create(provider, payment_id=payment_id)
    second = await create(provider, payment_id=payment_id, amount_minor=5)
    await create(provider)

    response = await provider.get("/charges", params={"payment_id": payment_id})

    assert response.status == 200
    listed = (await response.json())["data"]
    assert [c["id"] for c in listed] == [first["id"], second["id"]]
    assert listed[0] == await fetch(provider, first["id"])


async def test_lookup_of_an_unknown_payment_is_empty(provider: Client) -> None:
    response = await provider.get("/charges", params={"payment_id": str(uuid.uuid4())})
    assert response.status == 200
    assert await response.json() == {"data": []}


@pytest.mark.parametrize("query", ["", "?payment_id=", "?payment_id=nope", "?other=1"])
async def test_lookup_needs_a_valid_payment_id(provider: Client, query: str) -> None:
    response = await provider.get(f"/charges{query}")
    assert response.status == 400
    assert (await response.json())["error"] == "validation_error"


# --- settlement and webhooks ----------------------------------------------------------------


def assert_signed(received: Received) -> None:
    assert received.headers["Content-Type"] == "application/json"
    assert verify(received.body, received.headers, SECRETS) is Scheme.STANDARD
    # The current secret alone verifies too: the list's first one signs.
    assert verify(received.body, received.headers, SECRETS[:1]) is Scheme.STANDARD
    seed_only = CIMultiDict({SEED_HEADER: received.headers[SEED_HEADER]})
    assert verify(received.body, seed_only, SECRETS) is Scheme.SEED


async def test_a_charge_settles_after_the_delay_and_its_webhook_arrives(
    provider: Client, receiver: Receiver, db: Database
) -> None:
    before = counter("provider_charges_settled_total", status="succeeded")
    started = time.monotonic()
    charge = await create(provider)

    final = await eventually(lambda: settled(provider, charge["id"]), within=5)

    assert time.monotonic() - started >= 0.05
    assert final["status"] == "succeeded"
    assert final["decline_reason"] is None
    settled_at = dt.datetime.fromisoformat(final["settled_at"])
    assert settled_at - dt.datetime.fromisoformat(final["created_at"]) >= dt.timedelta(
        milliseconds=50
    )
    assert counter("provider_charges_settled_total", status="succeeded") == before + 1

    await eventually(lambda: receiver.requests, within=5)
    [received] = receiver.requests
    assert_signed(received)
    event = json.loads(received.body)
    assert list(event) == [
        "event_id",
        "event_type",
        "payment_id",
        "provider",
        "data",
        "created_at",
    ]
    assert EVENT_ID.match(event["event_id"])
    assert event["event_type"] == "payment.completed"
    assert event["payment_id"] == charge["payment_id"]
    assert event["provider"] == "simulated"
    assert event["data"] == {
        "reference": charge["reference"],
        "provider_reference": charge["id"],
        "amount_minor": 10000,
        "currency": "USD",
        "status": "succeeded",
        "decline_reason": None,
    }
    assert dt.datetime.fromisoformat(event["created_at"]) == settled_at
    # Compact JSON, exactly the stored bytes, announced under the event's id.
    assert received.body == json.dumps(event, separators=(",", ":")).encode()
    assert received.headers["webhook-id"] == event["event_id"]

    async def recorded() -> dict[str, Any] | None:
        # Recorded once the receiver's answer is back, a moment after it got the request.
        [delivery] = await deliveries(db, charge["id"])
        return delivery if delivery["state"] != "pending" else None

    delivery = await eventually(recorded, within=5)
    assert delivery["id"] == event["event_id"]
    assert delivery["body"] == received.body
    assert delivery["state"] == "delivered"
    assert delivery["attempts"] == 1
    assert delivery["last_status"] == 200
    assert delivery["delivered_at"] is not None


async def test_settlement_and_delivery_do_not_wait_for_the_poll(
    make_settings: MakeSettings,
    receiver: Receiver,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With a poll far longer than the test may take, only the wake-ups can settle the
    # charge and send its webhook, or send a declined charge's at once.
    monkeypatch.setattr(provider_app, "POLL_INTERVAL_SECONDS", 600.0)
    async with running(make_settings(provider_webhook_delay_ms=50)) as provider:
        charge = await create(provider)
        declined = await create(provider, customer_id="decline_now")
        await eventually(lambda: len(receiver.requests) == 2, within=10)

    events = {json.loads(r.body)["payment_id"]: json.loads(r.body) for r in receiver.requests}
    assert events[charge["payment_id"]]["data"]["status"] == "succeeded"
    assert events[declined["payment_id"]]["data"]["status"] == "declined"


async def test_with_decline_rate_1_charges_settle_declined(
    make_settings: MakeSettings, receiver: Receiver
) -> None:
    async with running(make_settings(provider_decline_rate=1.0)) as provider:
        charge = await create(provider)

        final = await eventually(lambda: settled(provider, charge["id"]), within=5)
        await eventually(lambda: receiver.requests, within=5)

    assert final["status"] == "declined"
    assert final["decline_reason"] == "insufficient_funds"
    event = json.loads(receiver.requests[0].body)
    assert event["event_type"] == "payment.failed"
    assert event["data"]["status"] == "declined"
    assert event["data"]["decline_reason"] == "insufficient_funds"


async def test_decline_customers_are_declined_at_once_with_a_webhook(
    provider: Client, receiver: Receiver
) -> None:
    charge = await create(provider, customer_id="decline_me")

    assert charge["status"] == "declined"
    assert charge["decline_reason"] == "card_declined"
    assert charge["settled_at"] is not None
    await eventually(lambda: receiver.requests, within=5)
    [received] = receiver.requests
    assert_signed(received)
    event = json.loads(received.body)
    assert event["event_type"] == "payment.failed"
    assert event["data"]["provider_reference"] == charge["id"]
    assert event["data"]["decline_reason"] == "card_declined"
    assert await fetch(provider, charge["id"]) == charge


async def test_a_failing_receiver_gets_the_webhook_retried_with_backoff(
    provider: Client, receiver: Receiver, db: Database
) -> None:
    receiver.failures_left = 2
    charge = await create(provider)

    async def delivered() -> dict[str, Any] | None:
        [delivery] = await deliveries(db, charge["id"]) or [None]
        return delivery if delivery and delivery["state"] == "delivered" else None

    delivery = await eventually(delivered, within=8)

    assert delivery["attempts"] == 3
    assert delivery["last_status"] == 200
    assert delivery["last_error"] is None
    first, second, third = receiver.requests
    assert first.body == second.body == third.body == delivery["body"]
    for received in receiver.requests:
        assert_signed(received)
    # 0.5 s after the first failure, then 1 s after the second.
    assert second.at - first.at >= 0.45
    assert third.at - second.at >= 0.95


async def test_with_drop_rate_1_nothing_is_sent(
    make_settings: MakeSettings, receiver: Receiver, db: Database
) -> None:
    before = counter("provider_webhook_deliveries_total", outcome="dropped")
    async with running(make_settings(provider_webhook_drop_rate=1.0)) as provider:
        charge = await create(provider)

        async def dropped() -> bool:
            return [d["state"] for d in await deliveries(db, charge["id"])] == ["dropped"]

        await eventually(dropped, within=5)
        await eventually(lambda: drained(db))
        assert (await fetch(provider, charge["id"]))["status"] == "succeeded"

    assert receiver.requests == []
    [delivery] = await deliveries(db, charge["id"])
    assert delivery["attempts"] == 0
    assert counter("provider_webhook_deliveries_total", outcome="dropped") == before + 1


async def test_with_duplicate_rate_1_the_same_request_arrives_twice(
    make_settings: MakeSettings, receiver: Receiver, db: Database
) -> None:
    async with running(make_settings(provider_webhook_duplicate_rate=1.0)) as provider:
        charge = await create(provider)
        await eventually(lambda: len(receiver.requests) == 2, within=5)
        await eventually(lambda: drained(db))

    first, second = receiver.requests
    assert first.body == second.body
    assert first.headers == second.headers
    assert_signed(second)
    [delivery] = await deliveries(db, charge["id"])
    assert delivery["state"] == "delivered"
    assert delivery["attempts"] == 1


async def test_with_error_rate_1_every_call_is_503_and_nothing_is_stored(
    make_settings: MakeSettings, db: Database
) -> None:
    async with running(make_settings(provider_error_rate=1.0)) as provider:
        created = await post_charge(provider, charge_body())
        by_id = await provider.get("/charges/ch_000000000000000000000000")
        listed = await provider.get("/charges", params={"payment_id": str(uuid.uuid4())})
        invalid = await post_charge(provider, b"{not json", key=None)
        health = await provider.get("/health")
        ready = await provider.get("/ready")

        for response in (created, by_id, listed, invalid):
            assert response.status == 503
            assert (await response.json())["error"] == "provider_unavailable"
            assert response.headers["Retry-After"]
        assert health.status == 200
        assert ready.status == 200
    assert await count_charges(db) == 0


async def test_state_survives_a_restart(
    make_settings: MakeSettings, receiver: Receiver, db: Database
) -> None:
    settings = make_settings(provider_webhook_delay_ms=800)
    async with running(settings) as provider:
        charge = await create(provider)
    row = await db.fetchrow("SELECT status FROM provider.charges WHERE id = $1", charge["id"])
    assert row is not None
    assert row["status"] == "processing", "settled before the restart: raise the delay"
    assert await deliveries(db) == []

    async with running(settings) as provider:
        assert await fetch(provider, charge["id"]) == charge
        replay = await post_charge(provider, {k: charge[k] for k in charge_body()}, key="x")
        assert replay.status == 201  # another key: another charge
        final = await eventually(lambda: settled(provider, charge["id"]), within=5)
        await eventually(lambda: len(receiver.requests) == 2, within=5)

    assert final["status"] == "succeeded"
    provider_references = {
        json.loads(r.body)["data"]["provider_reference"] for r in receiver.requests
    }
    assert charge["id"] in provider_references


async def test_two_replicas_settle_and_send_each_charge_once(
    make_settings: MakeSettings, receiver: Receiver, db: Database
) -> None:
    receiver.delay = 0.02
    settings = make_settings(provider_webhook_delay_ms=200)
    async with running(settings) as first, running(settings) as second:
        created = await asyncio.gather(*(create(first if n % 2 else second) for n in range(40)))

        async def all_delivered() -> bool:
            rows = await deliveries(db)
            return len(rows) == 40 and all(d["state"] == "delivered" for d in rows)

        await eventually(all_delivered, within=10)
        await eventually(lambda: drained(db))

    event_ids = [json.loads(r.body)["event_id"] for r in receiver.requests]
    assert len(event_ids) == 40
    assert len(set(event_ids)) == 40
    references = {json.loads(r.body)["data"]["provider_reference"] for r in receiver.requests}
    assert references == {c["id"] for c in created}


async def test_metrics_are_exposed(provider: Client) -> None:
    await create(provider)
    text = await (await provider.get("/metrics")).text()
    for name in (
        "provider_charges_total",
        "provider_charges_settled_total",
        "provider_webhook_deliveries_total",
    ):
        assert f"# TYPE {name} counter" in text


# --- delivery, step by step -----------------------------------------------------------------


def quiet_simulation() -> Simulation:
    return Simulation(
        settle_delay_ms=0, decline_rate=0, drop_rate=0, duplicate_rate=0, error_rate=0, seed=1
    )


@pytest.fixture
async def settled_charge(db: Database) -> str:
    """A charge that settled, so its webhook is queued; no provider loop is running."""
    simulation = quiet_simulation()
    request = ChargeRequest.model_validate_json(json.dumps(charge_body()))
    result = await create_charge(db, simulation, "step-by-step", request)
    assert await settle_due(db, simulation) == 1
    return result.charge.id


async def test_a_delivery_fails_for_good_after_its_last_attempt(
    db: Database, receiver: Receiver, settled_charge: str
) -> None:
    receiver.failures_left = 100
    target = WebhookTarget(url=receiver.url, secrets=SECRETS)
    policy = RetryPolicy(max_attempts=3, base_seconds=0)
    before = counter("provider_webhook_deliveries_total", outcome="failed")
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert await deliver_due(db, session, quiet_simulation(), target, policy=policy) == 1
        assert await deliver_due(db, session, quiet_simulation(), target, policy=policy) == 0

    [delivery] = await deliveries(db, settled_charge)
    assert delivery["state"] == "failed"
    assert delivery["attempts"] == 3
    assert delivery["last_status"] == 500
    assert "receiver not ready" in delivery["last_error"]
    assert len(receiver.requests) == 3
    assert counter("provider_webhook_deliveries_total", outcome="failed") == before + 1


async def test_a_network_error_is_retried_later(db: Database, settled_charge: str) -> None:
    target = WebhookTarget(url=f"http://127.0.0.1:{free_port()}/nobody", secrets=SECRETS)
    async with aiohttp.ClientSession() as session:
        assert await deliver_due(db, session, quiet_simulation(), target) == 1
        # Not due again before the backoff (0.5 s after a first failure).
        assert await deliver_due(db, session, quiet_simulation(), target) == 0

    [delivery] = await deliveries(db, settled_charge)
    assert delivery["state"] == "pending"
    assert delivery["attempts"] == 1
    assert delivery["last_status"] is None
    assert "Connect" in delivery["last_error"]
    wait = await db.fetchrow(
        "SELECT extract(epoch FROM next_attempt_at - now()) AS s"
        " FROM provider.webhook_deliveries WHERE id = $1",
        delivery["id"],
    )
    assert wait is not None
    assert 0.2 < float(wait["s"]) <= 0.5


async def test_two_workers_never_send_one_delivery_at_once(
    db: Database, receiver: Receiver, settled_charge: str
) -> None:
    receiver.delay = 0.3
    target = WebhookTarget(url=receiver.url, secrets=SECRETS)
    async with aiohttp.ClientSession() as session:
        taken = await asyncio.gather(
            *(deliver_due(db, session, quiet_simulation(), target) for _ in range(5))
        )

    assert sorted(taken) == [0, 0, 0, 0, 1]
    assert len(receiver.requests) == 1
    [delivery] = await deliveries(db, settled_charge)
    assert delivery["state"] == "delivered"


async def test_a_batch_records_each_outcome_and_spares_a_claim_taken_over(
    db: Database, receiver: Receiver
) -> None:
    """Three deliveries sent at once and recorded in one statement: one accepted, one
    refused (retried later), and one whose claim another worker took over mid-send,
    whose record is left to that worker."""
    simulation = quiet_simulation()
    for n in range(3):
        request = ChargeRequest.model_validate_json(json.dumps(charge_body()))
        await create_charge(db, simulation, f"batch-{n}", request)
    assert await settle_due(db, simulation) == 3
    receiver.failures_left = 1
    receiver.delay = 0.3
    target = WebhookTarget(url=receiver.url, secrets=SECRETS)
    async with aiohttp.ClientSession() as session:
        attempt = asyncio.create_task(deliver_due(db, session, simulation, target))
        await eventually(lambda: len(receiver.requests) == 3, within=5)
        row = await db.fetchrow(
            "UPDATE provider.webhook_deliveries SET next_attempt_at = now() + interval '1 h'"
            " WHERE id = (SELECT min(id) FROM provider.webhook_deliveries) RETURNING id"
        )
        assert await attempt == 3
    assert row is not None
    taken_over = row["id"]

    rows = {row["id"]: row for row in await deliveries(db)}
    assert rows[taken_over]["attempts"] == 0
    assert rows[taken_over]["state"] == "pending"
    others = sorted(
        (row["state"], row["attempts"], row["last_status"], row["delivered_at"] is not None)
        for id_, row in rows.items()
        if id_ != taken_over
    )
    assert others in (
        # The refused request was one of the other two, or the one taken over.
        [("delivered", 1, 200, True), ("pending", 1, 500, False)],
        [("delivered", 1, 200, True), ("delivered", 1, 200, True)],
    )


async def test_an_unexpected_error_in_one_send_spares_the_rest_of_its_batch(
    db: Database, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulation = quiet_simulation()
    for n in range(3):
        request = ChargeRequest.model_validate_json(json.dumps(charge_body()))
        await create_charge(db, simulation, f"unexpected-{n}", request)
    assert await settle_due(db, simulation) == 3
    broken = (await deliveries(db))[0]["id"]
    real_send = deliveries_module._send

    async def send(
        session: aiohttp.ClientSession, target: WebhookTarget, body: bytes, headers: dict[str, str]
    ) -> tuple[int | None, str | None]:
        if headers["webhook-id"] == broken:
            raise RuntimeError("a bug in one send")
        return await real_send(session, target, body, headers)

    monkeypatch.setattr(deliveries_module, "_send", send)
    target = WebhookTarget(url=receiver.url, secrets=SECRETS)
    async with aiohttp.ClientSession() as session:
        assert await deliver_due(db, session, simulation, target) == 3

    states = {row["id"]: (row["state"], row["attempts"]) for row in await deliveries(db)}
    assert states.pop(broken) == ("pending", 0)  # its claim expires; it is sent again then
    assert list(states.values()) == [("delivered", 1), ("delivered", 1)]
