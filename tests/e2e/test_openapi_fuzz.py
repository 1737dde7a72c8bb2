"""Schemathesis against the gateway's OpenAPI document: no 5xx, no undocumented answer.

It generates requests from the document (valid ones and deliberately invalid ones) and
checks every answer against the document: status codes, content types, headers and
bodies. The gateway runs as a real process on its own database and vhost.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.e2e.processes import start_service
from tests.openapi import DOCUMENT_PATH
from tests.support import admin_execute, database_dsn, fresh_vhost

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway_url(template_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_vhost() as rabbitmq_url:
        yield from _gateway(template_database, rabbitmq_url, tmp_path_factory)


def _gateway(
    template_database: str, rabbitmq_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    name = f"test_fuzz_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    gateway = start_service(
        "gateway",
        {
            "DATABASE_URL": database_dsn(name),
            "RABBITMQ_URL": rabbitmq_url,
            # Generated traffic is fast; the limits have their own tests.
            "RATE_LIMIT": "100000/second",
            "WEBHOOK_FAILURE_LIMIT": "100000/second",
        },
        tmp_path_factory.mktemp("fuzz"),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                ready = f"{gateway.url}/ready"
                with urllib.request.urlopen(ready, timeout=2) as response:  # noqa: S310 - http://127.0.0.1
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or gateway.process.poll() is not None:
                    raise AssertionError(f"gateway did not start:\n{gateway.logs()}") from None
            time.sleep(0.1)
        yield gateway.url
    finally:
        gateway.terminate()
        gateway.process.wait(timeout=15)
        asyncio.run(admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def operations() -> list[str]:
    document = schemathesis.openapi.from_path(Path(DOCUMENT_PATH))
    return [
        f"{result.ok().method.upper()} {result.ok().path}"
        for result in document.get_all_operations()
    ]


# Schemathesis's pytest plugin does not run under this pytest, so each operation is
# driven through its Hypothesis strategy directly; the checks are the same, but one: a
# request the document allows may still be refused, because some rules span fields the
# document cannot tie together (an amount's decimals depend on its currency).
@pytest.mark.parametrize("operation", operations())
def test_gateway_conforms_to_its_openapi_document(gateway_url: str, operation: str) -> None:
    document = schemathesis.openapi.from_path(Path(DOCUMENT_PATH))
    document.config.update(base_url=gateway_url)
    method, path = operation.split(" ", 1)
    strategy = document[path][method].as_strategy()

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=strategy)
    def conforms(case: Any) -> None:
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    conforms()
