"""README's "Publish a test message" and "Subscribe to payment events", run as written with
another AMQP client (pika) against the real services: the subscriber's queue receives
the payment's events, in order; `paymentsctl events tail` and `events list` see them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.processes import ROOT
from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e

LINE_TIMEOUT_SECONDS = 30


def readme_block(heading: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n### {heading}\n", 1)[1].split("\n#", 1)[0]
    [block] = re.findall(r"```bash\n(.*?)```", section, re.S)
    return block


def reader_env(stack: Stack) -> dict[str, str]:
    # `python3` and `paymentsctl` are the project's virtualenv's, where pika is installed.
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RABBITMQ_URL": stack.rabbitmq_url,
        "PAYMENTS_URL": f"http://127.0.0.1:{stack.gateway_port}",
    }


@contextlib.asynccontextmanager
async def started(
    argv: list[str], env: dict[str, str], cwd: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # A group of its own: bash runs python3 as a child, and both must stop.
        start_new_session=True,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait(), timeout=10)


async def line_of(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), timeout=LINE_TIMEOUT_SECONDS)
    assert line, "the process closed its output"
    return line.decode().rstrip("\n")


async def test_a_message_published_as_readme_shows_reaches_a_queue_bound_as_it_shows(
    stack: Stack, tmp_path: Path
) -> None:
    await stack.start("provider", PROVIDER_WEBHOOK_DELAY_MS="200", PROVIDER_DECLINE_RATE="0")
    await stack.start("payments")
    await stack.start("webhooks")
    await stack.start("gateway")
    env = reader_env(stack)
    workdir = tmp_path / "reader"
    workdir.mkdir()

    subscribe = ["bash", "-euo", "pipefail", "-c", readme_block("Subscribe to payment events")]
    tail = ["paymentsctl", "events", "tail", "--count", "3", "--timeout", "60", "--json"]
    async with (
        started(subscribe, env, workdir) as subscriber,
        started(tail, env, workdir) as tailer,
    ):
        assert await line_of(subscriber.stdout) == "bound orders.payment-events to payment.#"
        assert (await line_of(tailer.stderr)).startswith("tailing payment.#")

        published = await asyncio.create_subprocess_exec(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            readme_block("Publish a test message"),
            env=env,
            cwd=workdir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(published.communicate(), timeout=60)
        assert published.returncode == 0, err.decode()
        payment_id = out.decode().split()[-1]

        received: list[tuple[str, int]] = []
        while not received or received[-1][0] != "payment.completed":
            type_, event_payment, sequence = (await line_of(subscriber.stdout)).split()
            if event_payment == payment_id:
                received.append((type_, int(sequence)))
        assert received == [
            ("payment.pending", 1),
            ("payment.processing", 2),
            ("payment.completed", 3),
        ]

        tailed = [json.loads(await line_of(tailer.stdout)) for _ in range(3)]
        assert await asyncio.wait_for(tailer.wait(), timeout=30) == 0
    assert [(e["type"], e["payload"]["payment_id"]) for e in tailed] == [
        (t, payment_id) for t, _ in received
    ]

    listed = await asyncio.create_subprocess_exec(
        *("paymentsctl", "--json", "events", "list", "--payment", payment_id),
        env=env,
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(listed.communicate(), timeout=60)
    assert listed.returncode == 0, err.decode()
    page = json.loads(out)
    assert [e["payload"]["sequence"] for e in page["data"]] == [3, 2, 1]
    assert [e["message_id"] for e in reversed(page["data"])] == [e["message_id"] for e in tailed]
    assert all(e["published_at"] for e in page["data"])
