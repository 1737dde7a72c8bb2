"""Scenario e2e-cluster: the e2e scenario with RabbitMQ as a three-node cluster.

The same stack, load and figures as `e2e` (bench/end_to_end.py), with the broker a
cluster of three local RabbitMQ nodes (tests/cluster/nodes.py: own names, ports and
data, removed afterwards) and the services given every node in RABBITMQ_URL, so each
confirm waits for a quorum queue majority of two of three nodes on this one machine.
Run it with e2e (`--only e2e,e2e-cluster`) to compare one node against three in one run;
it then offers the same rates, as fractions of the intake limit e2e measured.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bench import end_to_end
from bench.common import Context
from bench.harness import say
from bench.report import ScenarioResult
from tests.cluster.nodes import LocalCluster


async def run(ctx: Context) -> ScenarioResult:
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = LocalCluster(root, prefix="bench")
    try:
        say("starting a local three-node RabbitMQ cluster")
        await cluster.start()
        ctx.harness.cluster = cluster
        result = await end_to_end.run(ctx)
    finally:
        ctx.harness.cluster = None
        await cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    result.name = "e2e-cluster"
    result.title = "/pay to completed, RabbitMQ a three-node cluster (quorum queues, 3 members)"
    result.details["rabbitmq_nodes"] = [node.name for node in cluster.nodes]
    return result
