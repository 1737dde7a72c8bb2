"""A three-node RabbitMQ cluster of local processes for the session, a vhost per test.

The cluster starts once (tests/cluster/nodes.py) and is stopped and removed at the end
of the session; every case leaves it with all three nodes running and clustered.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.cluster.nodes import LocalCluster, available


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    missing = available()
    if missing:
        pytest.fail(f"a local RabbitMQ cluster cannot run here: {missing}")
    local = LocalCluster(tmp_path_factory.mktemp("rabbitmq-cluster"))
    try:
        asyncio.run(local.start())
        yield local
    finally:
        asyncio.run(local.close())


@pytest.fixture
async def cluster_vhost(cluster: LocalCluster) -> AsyncIterator[str]:
    """A vhost of the test's own on the cluster: nothing an earlier case left reaches it."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    await cluster.add_vhost(name)
    try:
        yield name
    finally:
        await cluster.wait_clustered()
        await cluster.delete_vhost(name)
