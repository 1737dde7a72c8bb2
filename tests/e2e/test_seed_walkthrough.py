"""The seed project's README walkthrough, run as written against the real services."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.seed import (
    PAY,
    SEND_WITH_D,
    SIGN_AND_SEND,
    STATS,
    json_body,
    shell,
    write_payload,
)
from tests.e2e.stack import Stack
from tests.support import eventually

pytestmark = pytest.mark.e2e


async def test_the_seed_walkthrough_works_verbatim(stack: Stack, tmp_path: Path) -> None:
    # The provider settles much later: the walkthrough's own webhook is what completes it.
    await stack.start("provider", PROVIDER_WEBHOOK_DELAY_MS="600000")
    await stack.start("payments")
    await stack.start("webhooks")
    gateway = await stack.start("gateway")
    workdir = tmp_path / "walkthrough"
    workdir.mkdir()

    status, printed = shell(PAY, stack.gateway_port, workdir)
    assert status == 202
    payment = json_body(printed)

    status, printed = shell(STATS, stack.gateway_port, workdir)
    assert status == 200
    assert json_body(printed)["payments"]["total"] >= 0

    write_payload(payment, stack.gateway_port, workdir)
    assert (workdir / "payload.json").read_bytes().endswith(b"}}1\n")

    async with aiohttp.ClientSession(base_url=gateway.url) as http:

        async def payment_status() -> str | None:
            async with http.get(f"/api/payments/{payment['id']}") as response:
                return (await response.json())["status"] if response.status == 200 else None

        # The seed's flow sends the webhook once the payment exists.
        await eventually(payment_status, within=10)

        status, printed = shell(SIGN_AND_SEND, stack.gateway_port, workdir)
        assert printed.startswith("Signature: ")
        assert status == 202
        receipt = json_body(printed)
        assert receipt["received"] is True
        assert receipt["already_stored"] is False

        async def completed() -> bool:
            return await payment_status() == "completed"

        await eventually(completed, within=10)

        status, printed = shell(STATS, stack.gateway_port, workdir)
        stats = json_body(printed)
        assert stats["payments"]["by_status"]["completed"]["count"] == 1
        assert stats["webhooks"]["by_status"] == {"applied": 1}

        # The same file again: accepted, recognised, and nothing changes.
        status, printed = shell(SIGN_AND_SEND, stack.gateway_port, workdir)
        assert status == 202
        again = json_body(printed)
        assert again["already_stored"] is True
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
    _, printed = shell(SEND_WITH_D, stack.gateway_port, workdir, write_out=False)
    assert json.loads(printed)["error"] == "signature_invalid"
