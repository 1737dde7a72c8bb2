"""The seed project's README walkthrough, run as written against the real services.

Only the placeholders the seed asks the reader to replace are replaced (the payment's
id and reference), and localhost:3000 is pointed at this test's gateway port.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.processes import running_services
from tests.e2e.stack import Stack
from tests.support import eventually

pytestmark = pytest.mark.e2e

PAY = """curl -X POST http://localhost:3000/api/payments/pay \\
  -H "Content-Type: application/json" \\
  -d '{
    "amount": 100.00,
    "customer_id": "test_customer",
    "description": "Test payment from DevOps"
  }'"""

STATS = "curl http://localhost:3000/api/payments/stats"

PAYLOAD = """cat > payload.json <<EOF
{"event_type":"payment.completed","payment_id":"<replace-with-id-from-Simulating-"Process-a-Payment">","provider":"test_provider","data":{"reference":"<reference-from-from-Simulating-"Process-a-Payment">"}}1
EOF"""

SIGN_AND_SEND = """signature=$(openssl dgst -sha256 -hmac "webhook-secret-key" payload.json | awk '{print $2}')
echo "Signature: $signature"

curl -X POST http://localhost:3000/api/webhooks \\
  -H "Content-Type: application/json" \\
  -H "X-Webhook-Signature: $signature" \\
  --data-binary "@payload.json\""""  # noqa: E501 - the seed's signing line, as written

# The seed's "challenge" #1: curl -d re-formats the file, so the signature no longer matches.
SEND_WITH_D = """signature=$(openssl dgst -sha256 -hmac "webhook-secret-key" payload.json | awk '{print $2}')
curl -s -X POST http://localhost:3000/api/webhooks \\
  -H "Content-Type: application/json" \\
  -H "X-Webhook-Signature: $signature" \\
  -d @payload.json"""  # noqa: E501 - the seed's signing line, as written


@pytest.fixture
def stack(database_url: str, rabbitmq_url: str, tmp_path: Path) -> Iterator[Stack]:
    with running_services(tmp_path) as services:
        yield Stack(database_url, rabbitmq_url, tmp_path, services)


def shell(script: str, stack: Stack, workdir: Path, *, write_out: bool = True) -> tuple[int, str]:
    """Run `script` in bash; return the HTTP status of its last curl and what it printed."""
    script = script.replace("http://localhost:3000", f"http://127.0.0.1:{stack.gateway_port}")
    if write_out:
        # Only to read the status code; the seed's commands print just the body.
        script = script.replace("curl ", "curl -s -w '\\n%{http_code}' ", 1)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    if not write_out:
        return 0, result.stdout
    body, _, status = result.stdout.rstrip("\n").rpartition("\n")
    return int(status), body


def json_body(printed: str) -> Any:
    # The signing step echoes "Signature: …" before curl's answer.
    return json.loads(printed.splitlines()[-1])


async def test_the_seed_walkthrough_works_verbatim(stack: Stack, tmp_path: Path) -> None:
    # The provider settles much later: the walkthrough's own webhook is what completes it.
    await stack.start("provider", PROVIDER_WEBHOOK_DELAY_MS="600000")
    await stack.start("payments")
    await stack.start("webhooks")
    gateway = await stack.start("gateway")
    workdir = tmp_path / "walkthrough"
    workdir.mkdir()

    status, printed = shell(PAY, stack, workdir)
    assert status == 202
    payment = json_body(printed)

    status, printed = shell(STATS, stack, workdir)
    assert status == 200
    assert json_body(printed)["payments"]["total"] >= 0

    heredoc = PAYLOAD.replace(
        '<replace-with-id-from-Simulating-"Process-a-Payment">', payment["id"]
    ).replace('<reference-from-from-Simulating-"Process-a-Payment">', payment["reference"])
    shell(heredoc, stack, workdir, write_out=False)
    assert (workdir / "payload.json").read_bytes().endswith(b"}}1\n")

    async with aiohttp.ClientSession(base_url=gateway.url) as http:

        async def payment_status() -> str | None:
            async with http.get(f"/api/payments/{payment['id']}") as response:
                return (await response.json())["status"] if response.status == 200 else None

        # The seed's flow sends the webhook once the payment exists.
        await eventually(payment_status, within=10)

        status, printed = shell(SIGN_AND_SEND, stack, workdir)
        assert printed.startswith("Signature: ")
        assert status == 202
        receipt = json_body(printed)
        assert receipt["received"] is True
        assert receipt["duplicate"] is False

        async def completed() -> bool:
            return await payment_status() == "completed"

        await eventually(completed, within=10)

        status, printed = shell(STATS, stack, workdir)
        stats = json_body(printed)
        assert stats["payments"]["by_status"]["completed"]["count"] == 1
        assert stats["webhooks"]["by_status"] == {"applied": 1}

        # The same file again: accepted, recognised, and nothing changes.
        status, printed = shell(SIGN_AND_SEND, stack, workdir)
        assert status == 202
        again = json_body(printed)
        assert again["duplicate"] is True
        assert again["event_id"] == receipt["event_id"]

        async def counted_as_duplicate() -> bool:
            async with http.get(f"/api/webhooks/{receipt['event_id']}") as response:
                return (await response.json())["duplicates"] == 1

        await eventually(counted_as_duplicate, within=10)
        async with http.get(f"/api/webhooks/{receipt['event_id']}") as response:
            event = await response.json()
        assert event["status"] == "applied"
        assert event["payment"] == {"id": payment["id"], "status": "completed"}
        assert await payment_status() == "completed"

    # Sent with curl -d, which alters the bytes: refused.
    _, printed = shell(SEND_WITH_D, stack, workdir, write_out=False)
    assert json.loads(printed)["error"] == "signature_invalid"
