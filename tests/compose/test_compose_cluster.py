"""The platform on the three-node RabbitMQ cluster of docker-compose.cluster.yml, for real.

One project of `-f docker-compose.yml -f docker-compose.cluster.yml` (both files as they
are, through COMPOSE_FILE) on the suite's dockerd and stand-in images, Grafana left out
as in the other cases:

- the three nodes form one cluster and every quorum queue has a member on each;
- under the fault suite's load (tests/faults/harness.py), the node leading the
  payment-requested queue is `docker kill`ed, stays down a while and is started again
  with `docker compose start`, as an operator would (a killed container counts as
  stopped by hand: no restart policy brings it back). The checker's invariants hold, and
  payments must flow again while the node is still down: the services moved to the
  other two. The row joins the table of tests/cluster (same columns).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from tests.cluster.test_cluster_faults import ROWS, ClusterTable, FaultWindow
from tests.compose import harness
from tests.compose.conftest import COMPOSE_FILE, FIGURES
from tests.faults.harness import (
    FAULT_AT_SECONDS,
    TOPOLOGY,
    Checker,
    FaultContext,
    FaultRow,
    Load,
    check_invariants,
    record,
)
from tests.support import free_port

CLUSTER_FILE = harness.ROOT / "docker-compose.cluster.yml"
NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")
SERVICES: dict[str, Any] = {
    **yaml.safe_load(COMPOSE_FILE.read_text())["services"],
    **yaml.safe_load(CLUSTER_FILE.read_text())["services"],
}
RUNNING = [name for name in SERVICES if name != "grafana"]
NODE_DOWN_SECONDS = 15.0
AFTER_FAULT_SECONDS = 4.0
CLUSTERED_WITHIN_SECONDS = 120.0

pytestmark = [
    pytest.mark.timeout(600),
]


class Cluster:
    """The project, and its nodes as rabbitmqctl in their containers sees them."""

    def __init__(self, project: harness.Project, gateway: str) -> None:
        self.project = project
        self.gateway = gateway

    def container(self, node: str) -> str:
        [container] = self.project.containers(node)
        return container

    def ctl_command(self, node: str, tool: str = "rabbitmqctl") -> list[str]:
        """`docker exec <node> rabbitmqctl`: the container's cookie, its own node name."""
        return [
            "env",
            f"DOCKER_HOST=unix://{self.project.dockerd.socket}",
            harness.DOCKER,
            "exec",
            self.container(node),
            tool,
        ]

    def ctl(self, node: str, *args: str, tool: str = "rabbitmqctl") -> str:
        return harness.run([*self.ctl_command(node, tool), *args], timeout=60).stdout

    def running_nodes(self, via: str) -> list[str]:
        status = json.loads(self.ctl(via, "--quiet", "cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    def wait_clustered(self, via: str, within: float = CLUSTERED_WITHIN_SECONDS) -> float:
        """Until `via` sees all three nodes running; seconds it took."""
        started = time.monotonic()
        want = sorted(f"rabbit@{n}" for n in NODES)
        while True:
            try:
                seen = self.running_nodes(via)
            except RuntimeError as exc:  # the node is still booting
                seen = [str(exc).splitlines()[0]]
            if seen == want:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise AssertionError(f"{via} sees {seen}, not {want}")
            time.sleep(1.0)

    def quorum_queues(self, via: str) -> list[dict[str, Any]]:
        listed = self.ctl(
            via, "--quiet", "list_queues", "name", "type", "leader", "members",
            "--formatter", "json",
        )  # fmt: skip
        return [q for q in json.loads(listed) if q.get("type") == "quorum"]

    def leader_of(self, queue: str, via: str) -> str:
        """The service whose node leads `queue` (node names are rabbit@<hostname>)."""
        [found] = [q for q in self.quorum_queues(via) if q["name"] == queue]
        leader: str = found["leader"]
        return leader.split("@", 1)[1]


def check_three_members(cluster: Cluster, via: str) -> None:
    queues = cluster.quorum_queues(via)
    assert queues, "no quorum queue declared"
    want = sorted(f"rabbit@{n}" for n in NODES)
    wrong = {q["name"]: q["members"] for q in queues if sorted(q["members"]) != want}
    assert not wrong, f"quorum queues without a member on each node: {wrong}"


class ComposeCluster:
    """What `check_invariants` and `FaultWindow` ask of a platform."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.gateway = self  # FaultWindow reads `platform.gateway.url`
        self.url = cluster.gateway

    async def check_ready(self, within: float = 120.0) -> list[str]:
        try:
            await asyncio.to_thread(self.cluster.project.wait_healthy, RUNNING, within=within)
        except AssertionError as exc:
            return [str(exc)]
        return []


_up: list[Cluster] = []


@pytest.fixture(scope="module")
def cluster(
    dockerd: harness.Dockerd,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[Cluster]:
    ports = {
        name: free_port()
        for name in (
            "GATEWAY_HOST_PORT",
            "RABBITMQ_MANAGEMENT_HOST_PORT",
            "PROMETHEUS_HOST_PORT",
            "GRAFANA_HOST_PORT",
        )
    }
    env = {
        **{k: str(v) for k, v in ports.items()},
        # Both files, as README's `-f docker-compose.yml -f docker-compose.cluster.yml`.
        "COMPOSE_FILE": f"{COMPOSE_FILE}:{CLUSTER_FILE}",
        "COMPOSE_PATH_SEPARATOR": ":",
        # As the fault suite runs them: settling fast, reconciling only when asked.
        "PROVIDER_WEBHOOK_DELAY_MS": "100",
        "RECONCILE_CRON": "0 0 1 1 *",
        "RECONCILE_MIN_AGE_SECONDS": "1",
    }
    made = harness.Project(
        dockerd, f"pc{uuid.uuid4().hex[:6]}", COMPOSE_FILE, env, tmp_path_factory.mktemp("c")
    )
    if not pytestconfig.pluginmanager.has_plugin("cluster-table"):
        path = tmp_path_factory.mktemp("compose-cluster-faults") / "results.md"
        pytestconfig.pluginmanager.register(ClusterTable(path), "cluster-table")
    try:
        yield Cluster(made, f"http://127.0.0.1:{ports['GATEWAY_HOST_PORT']}")
    finally:
        made.close()


@pytest.fixture
def clustered(cluster: Cluster) -> Cluster:
    if not _up:
        pytest.fail("the cluster never came up (see the first case)")
    return cluster


def test_three_nodes_form_one_cluster_and_each_quorum_queue_has_three_members(
    cluster: Cluster,
) -> None:
    started = time.monotonic()
    cluster.project.up(*RUNNING)
    cluster.project.wait_healthy(RUNNING, within=300)
    FIGURES["cluster: up -d to every service healthy, s"] = time.monotonic() - started
    for node in NODES:
        cluster.wait_clustered(via=node)
    check_three_members(cluster, via="rabbitmq-3")
    _up.append(cluster)


async def test_docker_kill_of_the_payment_queue_leader_under_load(clustered: Cluster) -> None:
    queue = TOPOLOGY.payment_requested.name
    killed = await asyncio.to_thread(clustered.leader_of, queue, "rabbitmq")
    survivor = next(n for n in NODES if n != killed)
    project = clustered.project
    checker = Checker(
        f"postgresql://admin:password123@{project.ip('postgres')}:5432/payment_api",
        f"amqp://payments:payments@{project.ip(survivor)}:5672/",
        rabbitmqctl=clustered.ctl_command(survivor),
    )
    fault = "compose: leader node docker kill, compose start"
    platform = ComposeCluster(clustered)
    try:
        async with aiohttp.ClientSession() as http:
            load = Load(http, clustered.gateway, checker)
            ctx = FaultContext(platform=platform, load=load)
            ctx.details["killed"] = killed
            load.start(duration=FAULT_AT_SECONDS + NODE_DOWN_SECONDS + AFTER_FAULT_SECONDS + 10)
            await asyncio.sleep(FAULT_AT_SECONDS)
            ctx.began()
            async with FaultWindow(ctx):
                await asyncio.to_thread(project.dockerd.docker, "kill", clustered.container(killed))
                ctx.ended()  # from now on, payments must flow without it
                await asyncio.sleep(NODE_DOWN_SECONDS)
                started = time.monotonic()
                await asyncio.to_thread(project.compose, "start", killed)
                await asyncio.to_thread(clustered.wait_clustered, survivor)
                ctx.details["restart_s"] = round(time.monotonic() - started, 1)
                # Asked once the node is back: while it was down, rabbitmqctl on a
                # survivor failed in every run (exit 69, "TCP connection succeeded but
                # Erlang distribution failed"), at a time when looking the killed node's
                # name up took 20 s to fail (before harness.DnsForwarder). The leader
                # chosen during the outage stays where it is when the node returns.
                ctx.details["new_leader"] = await asyncio.to_thread(
                    clustered.leader_of, queue, survivor
                )
            await load.finish()
            row, problems = await check_invariants(fault, platform, checker, load, ctx)
    finally:
        await checker.close()
    record(row)
    ROWS.append(row)
    report_figures(row)
    assert not problems, problems
    assert row.lost == 0, row
    assert row.duplicates == 0, row
    assert row.answered > 100, row
    if not (row.recovery_seconds is not None and row.recovery_seconds < NODE_DOWN_SECONDS):
        row.passed = False
        raise AssertionError(
            f"{fault}: payments flowed again after {row.recovery_seconds}s,"
            f" not within the {NODE_DOWN_SECONDS}s the node was down ({row.details})"
        )
    assert row.details["new_leader"] != killed, row.details
    check_three_members(clustered, via=killed)


def report_figures(row: FaultRow) -> None:
    FIGURES["cluster kill case: requests"] = row.requests
    FIGURES["cluster kill case: 2xx"] = row.answered
    FIGURES["cluster kill case: 503"] = row.details["answers"].get("503", 0)
    FIGURES["cluster kill case: lost"] = row.lost
    FIGURES["cluster kill case: duplicated"] = row.duplicates
    if row.recovery_seconds is not None:
        FIGURES["cluster kill case: s until payments flow"] = row.recovery_seconds
