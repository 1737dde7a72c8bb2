"""An in-process gateway on the real database and broker, whose every answer is checked
against the OpenAPI document."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy

from libs.common.broker.topology import Topology
from libs.common.settings import GatewaySettings
from services.gateway.app import create_app
from tests.openapi import assert_conforms


@dataclasses.dataclass
class Answer:
    status: int
    body: Any
    headers: CIMultiDictProxy[str]


class Gateway:
    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.app = client.app

    async def call(self, method: str, path: str, **kwargs: Any) -> Answer:
        async with self.client.request(method, path, **kwargs) as response:
            raw = await response.read()
            content_type = response.content_type
            body: Any = json.loads(raw) if content_type == "application/json" else raw.decode()
            assert_conforms(method, path, response.status, content_type, body)
            return Answer(response.status, body, response.headers)

    async def pay(self, body: Any = None, *, raw: bytes | None = None, **kwargs: Any) -> Answer:
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        data = raw if raw is not None else json.dumps(body).encode()
        return await self.call("POST", "/api/payments/pay", data=data, headers=headers, **kwargs)


@asynccontextmanager
async def running_gateway(settings: GatewaySettings, topology: Topology) -> AsyncIterator[Gateway]:
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings, topology=topology)))
    await client.start_server()
    try:
        yield Gateway(client)
    finally:
        await client.close()
