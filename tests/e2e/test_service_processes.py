"""Every service starts as `python -m services.<name>`, serves its probes, and stops on SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.processes import ROOT, running_services, start_service

pytestmark = pytest.mark.e2e

SERVICES = ["gateway", "payments", "webhooks", "reconciler", "provider"]


@pytest.mark.parametrize("name", SERVICES)
async def test_service_serves_probes_and_stops_cleanly_on_sigterm(
    name: str, database_url: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": database_url, "RABBITMQ_URL": rabbitmq_url}
    with running_services(tmp_path) as services:
        service = start_service(name, env, tmp_path)
        services.append(service)
        await service.wait_ready()

        async with aiohttp.ClientSession(base_url=service.url) as http:
            async with http.get("/health") as response:
                assert response.status == 200
                assert await response.json() == {"status": "ok"}
            async with http.get("/ready") as response:
                body = await response.json()
                assert body["status"] == "ready"
                expected = {"database"} if name == "provider" else {"database", "broker"}
                assert body["checks"] == dict.fromkeys(expected, "ok")
            correlated = {"X-Correlation-ID": "e2e-1"}
            async with http.get("/no/such/route", headers=correlated) as response:
                assert response.status == 404
                assert response.headers["X-Correlation-ID"] == "e2e-1"
                assert (await response.json())["error"] == "not_found"
            async with http.get("/metrics") as response:
                assert response.status == 200
                text = await response.text()
                assert 'http_requests_total{method="GET",route="/health",status="200"}' in text
                assert 'route="unmatched"' in text

        service.terminate()
        assert await service.wait_exit(within=15) == 0

    lines = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
    assert lines, service.logs()
    assert all(line["service"] == name for line in lines)
    assert lines[-1]["message"] == "stopped"


@pytest.mark.parametrize("name", SERVICES)
def test_production_with_default_secrets_refuses_to_start(name: str) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DB_PASSWORD", "DATABASE_URL", "WEBHOOK_SECRET", "API_KEYS", "API_SECRET"}
    }
    result = subprocess.run(
        [sys.executable, "-m", f"services.{name}"],
        cwd=ROOT,
        env={**env, "APP_ENV": "production"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert f"{name}: invalid configuration" in result.stderr
    assert "refusing to start with APP_ENV=production" in result.stderr
    assert "Traceback" not in result.stderr
