"""The gateway's access log: one JSON line per request at INFO, never a secret or a body."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import pytest

from libs.common.logs import configure_logging
from libs.common.signing import SEED_HEADER
from tests.integration.conftest import MakeGateway

SECRET_KEY = "key-access-log-0a1b2c"


@pytest.fixture
def json_logs() -> Iterator[Callable[[], None]]:
    """Call it once the gateway runs (its start-up may configure logging its own way)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield lambda: configure_logging("gateway", "INFO")
    root.handlers[:] = handlers
    root.setLevel(level)


def access_lines(out: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "access"]


async def test_one_line_per_request_with_what_an_operator_needs(
    make_gateway: MakeGateway, json_logs: Callable[[], None], capsys: pytest.CaptureFixture[str]
) -> None:
    async with make_gateway(api_keys=SECRET_KEY) as gateway:
        json_logs()
        capsys.readouterr()
        paid = await gateway.call(
            "POST",
            "/api/payments/pay",
            data=b'{"amount": "12.34", "customer_id": "cust-secretive", "description": "d"}',
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {SECRET_KEY}",
                "X-Correlation-ID": "corr-access-1",
            },
        )
        assert paid.status == 202
        missing = await gateway.call("GET", "/api/payments/stats")
        assert missing.status == 401
        webhook = await gateway.call(
            "POST", "/api/webhooks", data=b"{}", headers={SEED_HEADER: "00" * 32}
        )
        assert webhook.status == 401
        out = capsys.readouterr().out

    lines = access_lines(out)
    assert [(x["method"], x["route"], x["status"]) for x in lines] == [
        ("POST", "/api/payments/pay", 202),
        ("GET", "/api/payments/stats", 401),
        ("POST", "/api/webhooks", 401),
    ]
    first = lines[0]
    assert first["level"] == "INFO"
    assert first["service"] == "gateway"
    assert first["correlation_id"] == "corr-access-1"
    assert first["path"] == "/api/payments/pay"
    assert isinstance(first["duration_ms"], float)
    assert first["client"] == "127.0.0.1"
    # Neither a key nor a body nor a signature is ever written.
    for secret in (SECRET_KEY, "cust-secretive", "12.34", "00" * 32):
        assert secret not in out


async def test_access_log_can_be_switched_off(
    make_gateway: MakeGateway, json_logs: Callable[[], None], capsys: pytest.CaptureFixture[str]
) -> None:
    async with make_gateway(access_log=False) as gateway:
        json_logs()
        capsys.readouterr()
        assert (await gateway.call("GET", "/health")).status == 200
        out = capsys.readouterr().out
    assert access_lines(out) == []
