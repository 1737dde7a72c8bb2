"""Fixtures for the gateway's integration tests: an in-process gateway on this test's
database and topology, whose every answer is checked against the OpenAPI document."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from libs.common.broker.connection import Broker
from libs.common.broker.topology import Topology
from libs.common.settings import GatewaySettings
from tests.integration.gateway_client import Gateway, running_gateway

MakeGateway = Callable[..., AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def make_gateway(
    database_url: str, rabbitmq_url: str, topology: Topology, broker: Broker
) -> MakeGateway:
    """`async with make_gateway(**settings) as gateway`. (`broker` declares this test's
    topology and deletes it afterwards.)"""

    def make(**overrides: Any) -> AbstractAsyncContextManager[Gateway]:
        settings = GatewaySettings(
            database_url=database_url, rabbitmq_url=rabbitmq_url, **overrides
        )
        return running_gateway(settings, topology)

    return make


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> AsyncIterator[Gateway]:
    async with make_gateway() as gateway:
        yield gateway
