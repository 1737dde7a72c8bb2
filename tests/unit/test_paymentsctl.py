"""paymentsctl without the platform: parsing, output, signing, exit codes.

Commands that call the API run against a small fake gateway (an aiohttp app on a
thread of its own), so what the CLI sends and how it prints each answer are checked
exactly; tests/e2e/test_paymentsctl.py runs it against the real services.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from libs.common import signing
from libs.common.broker.parking import ParkedMessage
from tests.support import free_port
from tools.paymentsctl import output
from tools.paymentsctl.cli import build_parser, load_settings, run

ROOT = Path(__file__).resolve().parents[2]
SECRET = "webhook-secret-key"
PAYLOAD = (
    b'{"event_type":"payment.completed","payment_id":"6810ac36-8000-45d4-a3a8-3bc23d6f156a",'
    b'"provider":"test_provider","data":{"reference":"PAY-YFNVR5CZBW"}}1\n'
)
PAYMENT_ID = "6810ac36-8000-45d4-a3a8-3bc23d6f156a"
RUN_ID = "b892b7f3-9855-4cc3-b1dc-79fdcbef8375"
PAYMENT = {
    "id": PAYMENT_ID,
    "reference": "PAY-YFNVR5CZBW",
    "status": "processing",
    "amount": "100.00",
    "currency": "USD",
    "customer_id": "test_customer",
    "description": None,
    "metadata": {"order": "1042"},
    "provider": "simulated",
    "provider_reference": "ch_2ccd41fbc13f29b35fb4a1e7",
    "failure_reason": None,
    "created_at": "2026-11-26T11:03:43.055625+00:00",
    "updated_at": "2026-11-26T11:03:43.074602+00:00",
}
EVENTS = [
    {
        "from_status": None,
        "to_status": "pending",
        "applied": True,
        "source": "api",
        "reason": "accepted by gateway",
        "at": "2026-11-26T11:03:43.064855+00:00",
    },
    {
        "from_status": "pending",
        "to_status": "processing",
        "applied": True,
        "source": "provider",
        "reason": "charge ch_2ccd41fbc13f29b35fb4a1e7 processing",
        "at": "2026-11-26T11:03:43.074602+00:00",
    },
]


def finished_run(status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {
        "id": RUN_ID,
        "trigger": "manual",
        "status": status,
        "started_at": "2026-11-26T11:04:00.145665+00:00",
        "finished_at": "2026-11-26T11:04:00.165467+00:00",
        "checked": 2,
        "updated": 1,
        "unchanged": 1,
        "errors": 0,
        "error_details": [],
        "duration_ms": 20,
        "changes": [
            {
                "payment_id": PAYMENT_ID,
                "from_status": "processing",
                "to_status": "completed",
                "reason": "provider charge ch_1 is succeeded",
                "at": "2026-11-26T11:04:00.160000+00:00",
            }
        ],
        **extra,
    }


@pytest.fixture(autouse=True)
def operator_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PAYMENTS_URL", "PAYMENTS_API_KEY", "WEBHOOK_SECRET", "RABBITMQ_URL", "APP_ENV"):
        monkeypatch.delenv(name, raising=False)


@dataclasses.dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def ctl(*argv: str) -> Result:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout=stdout, stderr=stderr)
    return Result(code, stdout.getvalue(), stderr.getvalue())


# --- parsing and usage ------------------------------------------------------------------------


def command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command and sub-command the parser knows, found by walking it."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*prefix, name))


ALL_COMMANDS = list(command_paths(build_parser()))


def test_every_command_of_the_brief_exists() -> None:
    expected = {
        (),
        ("pay",),
        ("payments",),
        ("payments", "get"),
        ("payments", "list"),
        ("stats",),
        ("refund",),
        ("refunds",),
        ("refunds", "list"),
        ("refunds", "get"),
        ("cancel",),
        ("webhook",),
        ("webhook", "sign"),
        ("webhook", "send"),
        ("reconcile",),
        ("events",),
        ("events", "list"),
        ("events", "tail"),
        ("dlq",),
        ("dlq", "list"),
        ("dlq", "show"),
        ("dlq", "replay"),
        ("dlq", "purge"),
    }
    assert set(ALL_COMMANDS) == expected


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "paymentsctl")
def test_help_works_for_every_command(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run([*path, "--help"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: " + " ".join(("paymentsctl", *path)))
    assert "exit codes:" in printed


def test_help_as_a_module_and_as_the_installed_script() -> None:
    module = subprocess.run(
        [sys.executable, "-m", "tools.paymentsctl", "dlq", "replay", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert module.returncode == 0, module.stderr
    assert "MESSAGE_ID" in module.stdout
    script = Path(sys.executable).parent / "paymentsctl"
    installed = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    assert installed.returncode == 0, installed.stderr
    assert "reconcile" in installed.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["pay", "--customer", "c"],
        ["pay", "--amount", "1"],
        ["pay", "--amount", "1", "--customer", "c", "--metadata", "no-equals-sign"],
        ["pay", "--amount", "1", "--customer", "c", "--metadata", "=value"],
        ["payments"],
        ["payments", "get"],
        ["payments", "list", "--limit", "0"],
        ["payments", "list", "--limit", "101"],
        ["payments", "list", "--status", "lost"],
        ["webhook", "sign"],
        ["webhook", "sign", "payload.json", "--scheme", "md5"],
        ["webhook", "sign", "payload.json", "--timestamp", "soon"],
        ["reconcile", "--timeout", "0"],
        ["reconcile", "--timeout", "soon"],
        ["--http-timeout", "-1", "stats"],
        ["dlq"],
        ["dlq", "show", "payment-requested"],
        ["dlq", "replay", "payment-requested"],
        ["dlq", "replay", "payment-requested", "some-id", "--all"],
        ["dlq", "purge", "payment-requested"],
        ["stats", "--no-such-option"],
    ],
    ids=" ".join,
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dlq", "purge", "payment-requested", "--all"], "add --yes"),
        (["payments", "get", "stats"], "is not an id"),
        (["--url", "ftp://example.com", "stats"], "must be http(s)"),
        (["--rabbitmq-url", "localhost", "dlq", "list"], "must look like amqp://"),
        (["webhook", "sign", "/no/such/file.json"], "cannot read /no/such/file.json"),
        (["--secret", ",", "webhook", "sign", "-"], "WEBHOOK_SECRET must hold at least one secret"),
    ],
)
def test_usage_errors_found_after_parsing_exit_2(argv: list[str], message: str) -> None:
    result = ctl(*argv)
    assert result.code == 2
    assert result.stderr.startswith("paymentsctl: error: ")
    assert message in result.stderr
    assert result.stdout == ""


def test_global_options_go_before_or_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--json", "stats"]).json is True
    assert parser.parse_args(["stats", "--json"]).json is True
    assert parser.parse_args(["stats"]).json is False
    after = parser.parse_args(["--url", "http://a:1", "payments", "list", "--http-timeout", "2"])
    assert (after.url, after.http_timeout) == ("http://a:1", 2.0)
    assert parser.parse_args(["--url", "http://a:1", "stats", "--url", "http://b:2"]).url == (
        "http://b:2"
    )


def test_pay_arguments() -> None:
    args = build_parser().parse_args(
        [
            *("pay", "--amount", "100.10", "--customer", "c1", "--idempotency-key", "k"),
            *("--metadata", "a=1", "b=x=y", "--metadata", "c="),
        ]
    )
    assert args.amount == "100.10"
    assert args.currency is None
    assert args.metadata == [("a", "1"), ("b", "x=y"), ("c", "")]


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYMENTS_URL", "http://env:3000")
    monkeypatch.setenv("PAYMENTS_API_KEY", "env-key")
    monkeypatch.setenv("WEBHOOK_SECRET", "env-1,env-2")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://env/")
    parser = build_parser()
    from_env = load_settings(parser.parse_args(["stats"]))
    assert from_env.payments_url == "http://env:3000"
    assert from_env.payments_api_key is not None
    assert from_env.payments_api_key.get_secret_value() == "env-key"
    assert [s.get_secret_value() for s in from_env.webhook_secret] == ["env-1", "env-2"]
    flags = parser.parse_args(
        [
            *("--url", "http://flag:1", "--api-key", "flag-key", "--secret", "flag-1,flag-2"),
            *("--rabbitmq-url", "amqp://flag/", "stats"),
        ]
    )
    settings = load_settings(flags)
    assert settings.payments_url == "http://flag:1"
    assert settings.payments_api_key is not None
    assert settings.payments_api_key.get_secret_value() == "flag-key"
    assert [s.get_secret_value() for s in settings.webhook_secret] == ["flag-1", "flag-2"]
    assert settings.rabbitmq_url.get_secret_value() == "amqp://flag/"


def test_defaults_without_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI is no service: production's refusals of default secrets do not stop it.
    monkeypatch.setenv("APP_ENV", "production")
    settings = load_settings(build_parser().parse_args(["stats"]))
    assert settings.payments_url == "http://localhost:3000"
    assert settings.payments_api_key is None
    assert [s.get_secret_value() for s in settings.webhook_secret] == [SECRET]


# --- webhook sign -----------------------------------------------------------------------------


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "payload.json"
    path.write_bytes(PAYLOAD)
    return path


def header_lines(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines())


def test_sign_both_schemes_as_the_library_does(payload: Path) -> None:
    result = ctl("webhook", "sign", str(payload), "--id", "msg_1", "--timestamp", "1764150000")
    assert result.code == 0
    expected = signing.signature_headers(
        PAYLOAD, [SECRET], message_id="msg_1", timestamp=1764150000
    )
    assert header_lines(result.stdout) == expected
    assert result.stdout == "".join(f"{k}: {v}\n" for k, v in expected.items())


def test_sign_seed_scheme_is_what_openssl_prints(payload: Path) -> None:
    result = ctl("webhook", "sign", str(payload), "--scheme", "seed")
    openssl = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", SECRET, str(payload)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.code == 0
    assert result.stdout == f"X-Webhook-Signature: {openssl.stdout.split()[-1]}\n"
    assert result.stdout.split(": ")[1].strip() == signing.seed_signature(PAYLOAD, SECRET)


def test_sign_standard_scheme_verifies(payload: Path) -> None:
    result = ctl(
        *("--secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw,old"),
        *("webhook", "sign", str(payload), "--scheme", "standard", "--timestamp", "1764150000"),
    )
    headers = header_lines(result.stdout)
    assert list(headers) == ["webhook-id", "webhook-timestamp", "webhook-signature"]
    assert headers["webhook-id"].startswith("msg_")
    assert headers["webhook-signature"] == signing.standard_signature(
        headers["webhook-id"], 1764150000, PAYLOAD, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    )
    scheme = signing.verify(
        PAYLOAD, headers, ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"], now=1764150000
    )
    assert scheme is signing.Scheme.STANDARD


def test_sign_json_and_standard_input() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.paymentsctl", "webhook", "sign", "-", "--json"],
        input=PAYLOAD,
        cwd=ROOT,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    headers = json.loads(result.stdout)
    assert headers["X-Webhook-Signature"] == signing.seed_signature(PAYLOAD, SECRET)
    assert signing.verify(PAYLOAD, headers, [SECRET]) is signing.Scheme.STANDARD


# --- output -----------------------------------------------------------------------------------


def test_table_pads_columns_and_aligns_numbers_right() -> None:
    text = output.table(["name", "count"], [["a", 5], ["longer", 12], [None, True]], right=[1])
    assert text.splitlines() == [
        "NAME    COUNT",
        "a           5",
        "longer     12",
        "-         yes",
    ]


def test_fields_align_values() -> None:
    assert output.fields([("id", "x"), ("reference", None)]) == "id:        x\nreference: -"


def test_payment_detail_shows_the_payment_and_its_events() -> None:
    text = output.payment_detail({**PAYMENT, "events": EVENTS})
    assert "amount:             100.00 USD" in text
    assert "metadata:           order=1042" in text
    assert "provider reference: ch_2ccd41fbc13f29b35fb4a1e7" in text
    events = text.split("events:\n", 1)[1].splitlines()
    assert events[0].split() == ["AT", "FROM", "TO", "APPLIED", "SOURCE", "REASON"]
    assert events[1].split()[:5] == [
        "2026-11-26T11:03:43.064855+00:00",
        "-",
        "pending",
        "yes",
        "api",
    ]
    assert events[2].endswith("charge ch_2ccd41fbc13f29b35fb4a1e7 processing")


def test_payment_list_and_its_next_page() -> None:
    text = output.payment_list([PAYMENT], "abc")
    header, row = text.splitlines()[:2]
    assert header.split() == [
        "ID",
        "REFERENCE",
        "STATUS",
        "AMOUNT",
        "CURRENCY",
        "CUSTOMER",
        "CREATED",
    ]
    assert row.split()[:4] == [PAYMENT_ID, "PAY-YFNVR5CZBW", "processing", "100.00"]
    assert text.endswith("more: --cursor abc  (or --all)")
    assert output.payment_list([], None) == "no payments"


def test_stats() -> None:
    text = output.stats(
        {
            "payments": {
                "total": 3,
                "by_status": {
                    "completed": {"count": 2, "amounts": {"USD": "100.00", "BHD": "7.500"}},
                    "failed": {"count": 1, "amounts": {"USD": "1.00"}},
                },
                "by_currency": {"USD": {"count": 2, "amount": "101.00"}},
                "success_rate": 2 / 3,
            },
            "webhooks": {"total": 1, "by_status": {"applied": 1}},
            "last_reconciliation": None,
        }
    )
    assert text.startswith("payments: 3 (success rate 66.7%)")
    assert "\ncompleted      2  100.00 USD, 7.500 BHD\n" in text
    assert "webhooks: 1" in text
    assert text.endswith("last reconciliation: none yet")
    empty = output.stats({"payments": {"total": 0, "success_rate": None}, "webhooks": {}})
    assert "success rate n/a" in empty


def test_run_summary_shows_changes_and_errors() -> None:
    text = output.run_summary(
        finished_run("partial", errors=1, error_details=[{"payment_id": "p1", "error": "timeout"}])
    )
    assert "status:    partial" in text
    assert "duration:  0.02 s" in text
    changes = text.split("changes:\n", 1)[1]
    assert changes.splitlines()[1].split()[:3] == [PAYMENT_ID, "processing", "completed"]
    assert text.split("errors:\n", 1)[1].splitlines()[1].split() == ["p1", "timeout"]
    assert "changes: none" in output.run_summary(finished_run(changes=[]))


def parked(body: bytes = b'{"a": 1}', error: str | None = "RuntimeError('boom')") -> ParkedMessage:
    return ParkedMessage(
        queue="platform.payment-requested",
        message_id="m-1",
        type="payment.requested",
        routing_key="payment.requested",
        reason="retries_exhausted",
        error=error,
        parked_at="2026-11-26T11:00:00+00:00",
        attempts=5,
        headers={"x-parked-reason": "retries_exhausted", "x-version": 1},
        body=body,
    )


def test_parked_messages() -> None:
    listed = output.parked_list("platform.payment-requested", [parked(error="x" * 200)])
    lines = listed.splitlines()
    assert lines[0] == "platform.payment-requested.parking: 1 parked"
    assert lines[1].split() == [
        "MESSAGE",
        "ID",
        "TYPE",
        "REASON",
        "ERROR",
        "PARKED",
        "AT",
        "ATTEMPTS",
    ]
    assert "x" * 59 + "…" in lines[2]
    assert lines[2].endswith("5")
    assert output.parked_list("q", []) == "q.parking: empty"

    detail = output.parked_detail(parked())
    assert "reason:      retries_exhausted" in detail
    assert "  x-version: 1" in detail
    assert detail.endswith('body:\n{\n  "a": 1\n}')

    as_json = output.parked_json(parked())
    assert as_json["body"] == '{"a": 1}'
    binary = output.parked_json(parked(body=b"\xff\x00"))
    assert "body" not in binary
    assert base64.b64decode(binary["body_base64"]) == b"\xff\x00"
    json.dumps(binary)


# --- against a fake gateway -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


class FakeGateway:
    """Answers each route with the answers given, in order (the last one repeats)."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[tuple[int, Any, dict[str, str]]]] = {}
        self.received: list[Received] = []
        self.url = ""

    def answer(
        self, method: str, path: str, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        self.answers.setdefault((method, path), []).append((status, body, headers or {}))

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(
            Received(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                await request.read(),
            )
        )
        queue = self.answers.get((request.method, request.path))
        if not queue:
            return web.json_response({"error": "no_route", "message": "not faked"}, status=404)
        status, body, headers = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(body, str):
            return web.Response(text=body, status=status, headers=headers, content_type="text/html")
        return web.json_response(body, status=status, headers=headers)


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    fake = FakeGateway()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


ACCEPTED = {
    key: PAYMENT[key]
    for key in (
        "id",
        "reference",
        "amount",
        "currency",
        "customer_id",
        "description",
        "metadata",
        "created_at",
    )
}


def test_pay_sends_the_amount_as_a_string_with_key_and_api_key(gateway: FakeGateway) -> None:
    gateway.answer("POST", "/api/payments/pay", 202, {**ACCEPTED, "status": "pending"})
    gateway.answer(
        "POST",
        "/api/payments/pay",
        202,
        {**ACCEPTED, "status": "pending"},
        {"Idempotent-Replayed": "true"},
    )
    argv = (
        *("--url", gateway.url, "--api-key", "k-1", "pay", "--amount", "100.10"),
        *(
            "--customer",
            "test_customer",
            "--idempotency-key",
            "order-1",
            "--metadata",
            "order=1042",
        ),
    )
    first = ctl(*argv)
    assert first.code == 0, first.stderr
    assert first.stdout.startswith("accepted\n")
    assert f"id:          {PAYMENT_ID}" in first.stdout
    sent = gateway.received[0]
    assert json.loads(sent.body) == {
        "amount": "100.10",
        "customer_id": "test_customer",
        "metadata": {"order": "1042"},
    }
    assert sent.headers["Idempotency-Key"] == "order-1"
    assert sent.headers["Authorization"] == "Bearer k-1"
    assert sent.headers["Content-Type"] == "application/json"
    assert "replayed" in ctl(*argv).stdout


def test_json_prints_the_api_answer(gateway: FakeGateway) -> None:
    detail = {**PAYMENT, "events": EVENTS}
    gateway.answer("GET", f"/api/payments/{PAYMENT_ID}", 200, detail)
    result = ctl("--url", gateway.url, "payments", "get", PAYMENT_ID, "--json")
    assert result.code == 0
    assert result.json() == detail
    assert "Authorization" not in gateway.received[0].headers


def test_refusal_exits_1_with_the_api_error(gateway: FakeGateway) -> None:
    gateway.answer(
        "GET",
        f"/api/payments/{PAYMENT_ID}",
        404,
        {"error": "payment_not_found", "message": f"No payment {PAYMENT_ID}."},
    )
    gateway.answer(
        "GET",
        "/api/payments/stats",
        429,
        {"error": "rate_limited", "message": "Too many requests."},
        {"Retry-After": "3"},
    )
    gateway.answer(
        "POST",
        "/api/payments/pay",
        422,
        {
            "error": "invalid_amount",
            "message": "amount: not a number.",
            "details": [{"field": "amount", "code": "invalid_amount", "message": "not a number"}],
        },
    )
    missing = ctl("--url", gateway.url, "--json", "payments", "get", PAYMENT_ID)
    assert missing.code == 1
    assert missing.stdout == ""
    assert missing.stderr == (
        f"paymentsctl: error: payment_not_found (HTTP 404): No payment {PAYMENT_ID}.\n"
    )
    limited = ctl("--url", gateway.url, "stats")
    assert limited.code == 1
    assert "rate_limited (HTTP 429)" in limited.stderr
    assert "retry after 3 s" in limited.stderr
    invalid = ctl("--url", gateway.url, "pay", "--amount", "x", "--customer", "c")
    assert invalid.code == 1
    assert "  amount: invalid_amount: not a number" in invalid.stderr


def test_an_answer_that_is_not_json_exits_1(gateway: FakeGateway) -> None:
    gateway.answer("GET", "/api/payments/stats", 502, "<html>Bad Gateway</html>")
    result = ctl("--url", gateway.url, "stats")
    assert result.code == 1
    assert "http_502 (HTTP 502)" in result.stderr


def test_list_all_follows_the_cursor(gateway: FakeGateway) -> None:
    second = {**PAYMENT, "id": "00000000-0000-4000-8000-000000000002"}
    gateway.answer("GET", "/api/payments", 200, {"data": [PAYMENT], "next_cursor": "c2"})
    gateway.answer("GET", "/api/payments", 200, {"data": [second], "next_cursor": None})
    result = ctl(
        "--url",
        gateway.url,
        "payments",
        "list",
        "--status",
        "processing",
        "--limit",
        "1",
        "--all",
        "--json",
    )
    assert result.code == 0
    assert result.json() == {"data": [PAYMENT, second], "next_cursor": None}
    assert [r.query for r in gateway.received] == [
        {"status": "processing", "limit": "1"},
        {"status": "processing", "limit": "1", "cursor": "c2"},
    ]


def test_webhook_send_posts_the_exact_bytes_signed(gateway: FakeGateway, payload: Path) -> None:
    receipt = {
        "received": True,
        "verified": True,
        "scheme": "standard",
        "event_id": "36c63b86-d139-56e4-9a17-ea54c959f844",
        "already_stored": False,
    }
    gateway.answer("POST", "/api/webhooks", 202, receipt)
    result = ctl("--url", gateway.url, "webhook", "send", str(payload))
    assert result.code == 0
    assert "event id:       36c63b86-d139-56e4-9a17-ea54c959f844" in result.stdout
    assert "already stored: no" in result.stdout
    sent = gateway.received[0]
    assert sent.body == PAYLOAD
    assert sent.headers["Content-Type"] == "application/json"
    assert signing.verify(sent.body, sent.headers, [SECRET]) is signing.Scheme.STANDARD
    assert sent.headers["X-Webhook-Signature"] == signing.seed_signature(PAYLOAD, SECRET)


def test_reconcile_waits_through_404_and_running(gateway: FakeGateway) -> None:
    gateway.answer(
        "POST",
        "/api/reconciliations",
        202,
        {"id": RUN_ID, "status": "requested", "trigger": "manual"},
    )
    path = f"/api/reconciliations/{RUN_ID}"
    gateway.answer("GET", path, 404, {"error": "run_not_found", "message": "not yet"})
    gateway.answer("GET", path, 200, finished_run("running", finished_at=None))
    gateway.answer("GET", path, 200, finished_run())
    result = ctl("--url", gateway.url, "reconcile")
    assert result.code == 0, result.stderr
    assert f"run:       {RUN_ID}" in result.stdout
    assert "status:    completed" in result.stdout
    assert [r.method for r in gateway.received] == ["POST", "GET", "GET", "GET"]


@pytest.mark.parametrize("status", ["failed", "partial"])
def test_reconcile_exits_1_when_the_run_did_not_settle_everything(
    gateway: FakeGateway, status: str
) -> None:
    gateway.answer(
        "POST",
        "/api/reconciliations",
        202,
        {"id": RUN_ID, "status": "requested", "trigger": "manual"},
    )
    gateway.answer("GET", f"/api/reconciliations/{RUN_ID}", 200, finished_run(status))
    result = ctl("--url", gateway.url, "reconcile", "--json")
    assert result.code == 1
    assert result.json()["status"] == status
    assert f"run {RUN_ID} ended {status}" in result.stderr


def test_reconcile_no_wait_and_timeout(gateway: FakeGateway) -> None:
    gateway.answer(
        "POST",
        "/api/reconciliations",
        202,
        {"id": RUN_ID, "status": "requested", "trigger": "manual"},
    )
    gateway.answer(
        "GET",
        f"/api/reconciliations/{RUN_ID}",
        404,
        {"error": "run_not_found", "message": "not yet"},
    )
    assert ctl("--url", gateway.url, "reconcile", "--no-wait").stdout == f"run {RUN_ID} requested\n"
    result = ctl("--url", gateway.url, "reconcile", "--timeout", "0.3")
    assert result.code == 3
    assert "did not finish within 0.3 s (not started: is the reconciler running?)" in result.stderr


# --- cannot connect ---------------------------------------------------------------------------


def test_nothing_listening_exits_3() -> None:
    result = ctl("--url", f"http://127.0.0.1:{free_port()}", "stats")
    assert result.code == 3
    assert "cannot connect to the gateway" in result.stderr


def test_no_answer_in_time_exits_3() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete; nobody ever answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = ctl("--url", url, "--http-timeout", "0.3", "stats")
    assert result.code == 3
    assert "no answer within 0.3 s" in result.stderr


def test_broker_not_listening_exits_3() -> None:
    result = ctl("--rabbitmq-url", f"amqp://guest:secret@127.0.0.1:{free_port()}/", "dlq", "list")
    assert result.code == 3
    assert "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1" in result.stderr
    assert "secret" not in result.stderr
