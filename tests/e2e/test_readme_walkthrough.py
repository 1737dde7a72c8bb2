"""Every shell command in README's walkthrough, run in order against a running stack.

The blocks are read from README itself, so the documented commands are the tested ones.
Only what README tells the reader to replace is replaced (the payment's id and
reference), and localhost:3000 is pointed at this test's gateway.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.processes import ROOT
from tests.e2e.stack import Stack
from tests.support import eventually

pytestmark = pytest.mark.e2e

ID_PLACEHOLDER = '<replace-with-id-from-Simulating-"Process-a-Payment">'
REFERENCE_PLACEHOLDER = '<reference-from-from-Simulating-"Process-a-Payment">'


def walkthrough_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Walkthrough", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def run_block(block: str, stack: Stack, workdir: Path) -> subprocess.CompletedProcess[str]:
    script = block.replace("http://localhost:3000", f"http://127.0.0.1:{stack.gateway_port}")
    bin_dir = str(Path(sys.executable).parent)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        env={
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PAYMENTS_URL": f"http://127.0.0.1:{stack.gateway_port}",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def provider_hold(block: str) -> str:
    """The PROVIDER_WEBHOOK_DELAY_MS README's first block starts the provider with."""
    found = re.fullmatch(r"PROVIDER_WEBHOOK_DELAY_MS=(\d+) docker compose up -d provider\n", block)
    assert found, f"README's first walkthrough block changed: {block!r}"
    return found.group(1)


def last_json(output: str) -> Any:
    return json.loads(output.strip().splitlines()[-1])


async def test_every_walkthrough_command_works_as_documented(stack: Stack, tmp_path: Path) -> None:
    blocks = walkthrough_blocks()
    assert len(blocks) == 6, "README's walkthrough changed: update this test's expectations"
    hold, pay, stats, payload, sign_and_send, with_paymentsctl = blocks

    # The first block has the provider hold charges (with compose); here the same setting
    # is given to the provider process, so the walkthrough's own webhook completes it.
    delay = provider_hold(hold)
    await stack.start("provider", PROVIDER_WEBHOOK_DELAY_MS=delay)
    for name in ("payments", "webhooks", "reconciler"):
        await stack.start(name)
    gateway = await stack.start("gateway")
    workdir = tmp_path / "reader"
    workdir.mkdir()

    paid = run_block(pay, stack, workdir)
    assert paid.returncode == 0, paid.stderr
    payment = last_json(paid.stdout)
    assert payment["status"] == "pending"

    counted = run_block(stats, stack, workdir)
    assert counted.returncode == 0, counted.stderr
    assert "payments" in last_json(counted.stdout)

    written = run_block(
        payload.replace(ID_PLACEHOLDER, payment["id"]).replace(
            REFERENCE_PLACEHOLDER, payment["reference"]
        ),
        stack,
        workdir,
    )
    assert written.returncode == 0, written.stderr

    async with aiohttp.ClientSession(gateway.url) as http:

        async def status() -> str | None:
            async with http.get(f"/api/payments/{payment['id']}") as response:
                return (await response.json()).get("status") if response.status == 200 else None

        await eventually(status, within=10)
        sent = run_block(sign_and_send, stack, workdir)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.startswith("Signature: ")
        receipt = last_json(sent.stdout)
        assert receipt["received"] is True
        assert receipt["verified"] is True

        async def completed() -> bool:
            return await status() == "completed"

        await eventually(completed, within=10)

    # The paymentsctl block: every line must succeed.
    for line in with_paymentsctl.strip().splitlines():
        result = run_block(line, stack, workdir)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
