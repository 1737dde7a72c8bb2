"""`make run`'s launcher: the whole stack as local processes, the seed's curl flow on it,
one correlation id across every service, and Ctrl-C stopping everything."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.processes import ROOT
from tests.e2e.seed import PAY, SIGN_AND_SEND, STATS, json_body, shell, write_payload
from tests.support import eventually

pytestmark = pytest.mark.e2e

SERVICES = ("provider", "payments", "webhooks", "reconciler", "gateway")


def port_offset() -> int:
    """An offset whose every port is free (the launcher would fail loudly otherwise)."""
    for _ in range(50):
        offset = random.randrange(20_000, 40_000)
        ports = [p + offset for p in (3000, 3100, 9101, 9102, 9103)]
        if all(p < 65536 for p in ports):
            try:
                for port in ports:
                    with socket.socket() as sock:
                        sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return offset
    raise AssertionError("no free port range")


def start_launcher(
    offset: int, env: dict[str, str], out_path: Path, err_path: Path
) -> subprocess.Popen[bytes]:
    with out_path.open("wb") as out, err_path.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "scripts/run_stack.py", "--port-offset", str(offset)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=err,
        )


def processes_matching(pattern: str) -> str:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return found.stdout.strip()


async def test_make_run_serves_the_seed_flow_and_stops_on_ctrl_c(
    database_url: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    offset = port_offset()
    gateway_port = 3000 + offset
    out_path, err_path = tmp_path / "stack.out", tmp_path / "stack.err"
    env = {
        "DATABASE_URL": database_url,
        "RABBITMQ_URL": rabbitmq_url,
        "PROVIDER_WEBHOOK_DELAY_MS": "200",
        "PROVIDER_DECLINE_RATE": "0",
    }
    launcher = start_launcher(offset, env, out_path, err_path)
    try:
        await eventually(
            lambda: "Ctrl-C stops them all" in err_path.read_text(), within=90, interval=0.2
        )
        announced = err_path.read_text()
        for name in SERVICES:
            assert f"{name}" in announced
        assert f"http://127.0.0.1:{gateway_port}" in announced

        workdir = tmp_path / "walkthrough"
        workdir.mkdir()
        status, printed = shell(PAY, gateway_port, workdir)
        assert status == 202
        payment = json_body(printed)
        status, printed = shell(STATS, gateway_port, workdir)
        assert status == 200

        async with aiohttp.ClientSession(f"http://127.0.0.1:{gateway_port}") as http:

            def completed(payment_id: str) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    async with http.get(f"/api/payments/{payment_id}") as response:
                        return bool((await response.json()).get("status") == "completed")

                return check

            # The provider settles it and its signed webhook completes it: the full loop.
            await eventually(completed(payment["id"]), within=20)
            write_payload(payment, gateway_port, workdir)
            status, printed = shell(SIGN_AND_SEND, gateway_port, workdir)
            assert status == 202
            assert json_body(printed)["received"] is True

            # One request's correlation id, followed through every service it reaches.
            trace = "trace-run-stack-1"
            async with http.post(
                "/api/payments/pay",
                json={"amount": "12.34", "customer_id": "traced"},
                headers={"X-Correlation-ID": trace},
            ) as response:
                assert response.status == 202
                # The gateway keeps the caller's id; it logs an accepted payment at DEBUG only.
                assert response.headers["X-Correlation-ID"] == trace
                traced = await response.json()
            await eventually(completed(traced["id"]), within=20)
            await asyncio.sleep(0.5)  # let the last lines reach the log
    finally:
        launcher.send_signal(signal.SIGINT)
        code = launcher.wait(timeout=40)
    assert code == 0
    assert "stopped" in err_path.read_text()
    assert processes_matching(f"--port-offset {offset}") == ""

    lines = [json.loads(line) for line in out_path.read_text().splitlines() if line.startswith("{")]
    traced_services = {line["service"] for line in lines if line.get("correlation_id") == trace}
    assert traced_services >= {"payments", "provider", "webhooks"}, traced_services
    messages = {line["message"] for line in lines if line.get("correlation_id") == trace}
    assert "charge recorded" in messages
    assert not any("password123" in json.dumps(line) for line in lines)
    stopped = {line["service"] for line in lines if line["message"] == "stopped"}
    assert stopped == set(SERVICES)
