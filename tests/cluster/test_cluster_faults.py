"""A three-node RabbitMQ cluster losing a node under load: nothing lost, nothing doubled.

Every service runs as a real process against the local cluster (tests/cluster/nodes.py),
given every node in RABBITMQ_URL, and the fault suite's load and checker run unchanged
(tests/faults/harness.py): every 2xx has exactly one payment, every webhook one effect,
nothing is left unacked. The faults:

- the node leading the queues is SIGKILLed, stays down a while, and is started again;
- one node (the leader) is cut off from the other two for 30 s, then healed. The cut is
  made at the Erlang distribution layer (tests/cluster/nodes.py `partition`): the node
  uses a wrong cookie for its peers and drops its connections to them, so no handshake
  succeeds either way until healed. The cluster sees a real partition (pause_minority
  pauses the lone node, which closes its client connections); what it does not see is
  a link that goes silent, which only the net tick (60 s by default) would notice;
- a rolling restart: each node in turn, once `rabbitmq-queues
  check_if_node_is_quorum_critical` says it may go, stopped cleanly and started again;
- the services' connections to one node cut (a TCP proxy per node, the busiest one cut
  and refusing for a few seconds).

A cluster is there to keep taking payments while a node is away, so "recovery" counts
from the moment the fault begins until a payment accepted from then on settles, and it
must come while the fault still lasts (the rolling restart excepted, whose length is
what the restarts take). Each
case also reports the gateway's publish-to-confirm p99 while the fault lasted (from its
`message_publish_duration_seconds` histogram) and the 503s clients got (each with
Retry-After, which the harness checks). The session ends with the table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.nodes import LocalCluster, Node
from tests.faults.harness import (
    FAULT_AT_SECONDS,
    RESULTS,
    TOPOLOGY,
    FaultContext,
    FaultRow,
    Inject,
    run_case,
)
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

NODE_DOWN_SECONDS = 5.0
PARTITION_SECONDS = 30.0
CONNECTION_CUT_SECONDS = 5.0
# The load runs past the end of each fault, so that payments arrive all through it.
AFTER_FAULT_SECONDS = 4.0
QUORUM_CRITICAL_WITHIN_SECONDS = 60.0

ROWS: list[FaultRow] = []
COLUMNS = (
    "fault",
    "fault s",
    "requests",
    "2xx",
    "503 (Retry-After)",
    "lost",
    "duplicated",
    "s until payments flow",
    "publish p99 ms (fault)",
    "passed",
)


def cluster_table(rows: list[FaultRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        p99 = row.details.get("publish_p99_seconds")
        cells = [
            row.fault,
            "-" if row.fault_seconds is None else f"{row.details.get('fault_window_s', 0):.1f}",
            str(row.requests),
            str(row.answered),
            str(row.details["answers"].get("503", 0)),
            str(row.lost),
            str(row.duplicates),
            "-" if row.recovery_seconds is None else f"{row.recovery_seconds:.1f}",
            "-" if p99 is None else f"{p99 * 1000:.0f}",
            "yes" if row.passed else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class ClusterTable:
    def __init__(self, path: Path) -> None:
        self.path = path

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not ROWS:
            return
        terminalreporter.write_sep("=", "RabbitMQ cluster faults")
        for line in cluster_table(ROWS).splitlines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(also in {self.path})")


@pytest.fixture(scope="module", autouse=True)
def table(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    path = tmp_path_factory.mktemp("cluster-faults", numbered=False) / "results.md"
    if not pytestconfig.pluginmanager.has_plugin("cluster-table"):
        pytestconfig.pluginmanager.register(ClusterTable(path), "cluster-table")
    yield
    path.write_text(cluster_table(ROWS))


# --- what the cases measure ---------------------------------------------------------------


async def publish_buckets(gateway_url: str) -> dict[float, float]:
    """The gateway's publish-duration histogram: cumulative count per upper bound."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway_url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response,
    ):
        text = await response.text()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "message_publish_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """The q-quantile of what was observed between two readings, the way Prometheus's
    histogram_quantile estimates it (linear within the bucket it falls in)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


class FaultWindow:
    """From the fault's first blow until the cluster is whole again: its length, and
    the gateway's publish p99 over it."""

    def __init__(self, ctx: FaultContext) -> None:
        self.ctx = ctx
        self.started = 0.0
        self.before: dict[float, float] = {}

    async def __aenter__(self) -> FaultWindow:
        self.before = await publish_buckets(self.ctx.platform.gateway.url)
        self.started = time.monotonic()
        return self

    async def __aexit__(self, *exc: object) -> None:
        after = await publish_buckets(self.ctx.platform.gateway.url)
        self.ctx.details["fault_window_s"] = round(time.monotonic() - self.started, 1)
        self.ctx.details["publish_p99_seconds"] = quantile(0.99, self.before, after)
        self.ctx.details["publishes_in_fault"] = after.get(float("inf"), 0.0) - self.before.get(
            float("inf"), 0.0
        )


async def queue_leader(cluster: LocalCluster, vhost: str) -> Node:
    """The node leading the payments queue (all queues, when one client declared them)."""
    queues = {q["name"]: q for q in await cluster.quorum_queues(vhost)}
    return cluster.node_named(queues[TOPOLOGY.payment_requested.name]["leader"])


async def check_three_members(cluster: LocalCluster, vhost: str) -> None:
    queues = await cluster.quorum_queues(vhost)
    assert queues, "no quorum queue declared"
    want = sorted(n.name for n in cluster.nodes)
    wrong = {q["name"]: q["members"] for q in queues if sorted(q["members"]) != want}
    assert not wrong, f"quorum queues without a member on each node: {wrong}"


async def cluster_case(
    fault: str,
    inject: Inject,
    *,
    cluster: LocalCluster,
    vhost: str,
    database_url: str,
    tmp_path: Path,
    fault_seconds: float,
    flows_within: float | None,
    services_url: str | None = None,
) -> FaultRow:
    """The fault suite's case (run_case) on the cluster, its row kept for the table.

    `flows_within`: payments must flow again this soon after the fault began, while it
    still lasts (the cluster serves without the lost node; the clients failed over).
    """
    try:
        row = await run_case(
            fault,
            inject,
            database_url=database_url,
            rabbitmq_url=cluster.nodes[0].url(vhost),
            services_rabbitmq_url=services_url or cluster.urls(vhost),
            tmp_path=tmp_path,
            load_seconds=FAULT_AT_SECONDS + fault_seconds + AFTER_FAULT_SECONDS,
            rabbitmqctl=cluster.ctl_command(cluster.nodes[0]),
        )
    finally:
        # run_case records the row before it asserts: failed cases are in the table too.
        ROWS.extend(r for r in RESULTS[-1:] if r.fault == fault)
    if flows_within is not None and not (
        row.recovery_seconds is not None and row.recovery_seconds < flows_within
    ):
        row.passed = False
        raise AssertionError(
            f"{fault}: payments flowed again after {row.recovery_seconds}s,"
            f" not within {flows_within}s while the fault lasted ({row.details})"
        )
    await check_three_members(cluster, vhost)
    return row


# --- the cases ----------------------------------------------------------------------------


async def test_leader_node_killed_then_restarted(
    cluster: LocalCluster, cluster_vhost: str, database_url: str, tmp_path: Path
) -> None:
    async def inject(ctx: FaultContext) -> None:
        await check_three_members(cluster, cluster_vhost)
        leader = await queue_leader(cluster, cluster_vhost)
        ctx.details["killed"] = leader.name
        async with FaultWindow(ctx):
            cluster.kill(leader)
            ctx.ended()  # from now on, payments must flow without it
            await asyncio.sleep(NODE_DOWN_SECONDS)
            moved_to = await queue_leader(cluster, cluster_vhost)
            ctx.details["new_leader"] = moved_to.name
            if moved_to is leader:
                ctx.notes.append("the queue kept its dead leader")
            ctx.details["restart_s"] = round(await cluster.start_node(leader), 1)

    await cluster_case(
        "leader node SIGKILLed, restarted",
        inject,
        cluster=cluster,
        vhost=cluster_vhost,
        database_url=database_url,
        tmp_path=tmp_path,
        fault_seconds=NODE_DOWN_SECONDS + 10,
        flows_within=NODE_DOWN_SECONDS,
    )


async def test_node_cut_off_from_the_others(
    cluster: LocalCluster, cluster_vhost: str, database_url: str, tmp_path: Path
) -> None:
    async def inject(ctx: FaultContext) -> None:
        lone = await queue_leader(cluster, cluster_vhost)
        ctx.details["cut_off"] = lone.name
        async with FaultWindow(ctx):
            await cluster.partition(lone)
            ctx.ended()
            paused = False
            deadline = time.monotonic() + PARTITION_SECONDS
            while time.monotonic() < deadline:
                # pause_minority: alone, the node stops its broker until it sees the others.
                if await cluster.eval(lone, "rabbit:is_running().") == "false":
                    paused = True
                await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            ctx.details["lone_node_paused"] = paused
            if not paused:
                ctx.notes.append(f"{lone.name} never paused while cut off")
            await cluster.heal(lone)
            await cluster.wait_clustered()

    await cluster_case(
        f"one node cut off {PARTITION_SECONDS:.0f}s, healed",
        inject,
        cluster=cluster,
        vhost=cluster_vhost,
        database_url=database_url,
        tmp_path=tmp_path,
        fault_seconds=PARTITION_SECONDS + 2,
        flows_within=PARTITION_SECONDS,
    )


async def wait_not_quorum_critical(cluster: LocalCluster, node: Node) -> None:
    """Until stopping `node` would leave every quorum queue a majority (the check README
    tells operators to run before maintenance)."""
    deadline = time.monotonic() + QUORUM_CRITICAL_WITHIN_SECONDS
    while True:
        try:
            await cluster.ctl(
                node, "check_if_node_is_quorum_critical", tool="rabbitmq-queues", attempts=1
            )
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        else:
            return
        await asyncio.sleep(1.0)


async def test_rolling_restart(
    cluster: LocalCluster, cluster_vhost: str, database_url: str, tmp_path: Path
) -> None:
    async def inject(ctx: FaultContext) -> None:
        restarts = {}
        async with FaultWindow(ctx):
            for i, node in enumerate(cluster.nodes):
                await wait_not_quorum_critical(cluster, node)
                await cluster.stop_node(node)
                if i == 0:
                    ctx.ended()
                restarts[node.name] = round(await cluster.start_node(node), 1)
        ctx.details["restart_s"] = restarts

    await cluster_case(
        "rolling restart of the three nodes",
        inject,
        cluster=cluster,
        vhost=cluster_vhost,
        database_url=database_url,
        tmp_path=tmp_path,
        fault_seconds=36,
        # Each node is down for as long as its restart takes, which load stretches.
        flows_within=None,
    )


async def test_client_connections_to_one_node_cut(
    cluster: LocalCluster, cluster_vhost: str, database_url: str, tmp_path: Path
) -> None:
    proxies = [TcpProxy("127.0.0.1", node.amqp_port) for node in cluster.nodes]
    for proxy in proxies:
        await proxy.start()
    urls = ",".join(
        f"amqp://guest:guest@127.0.0.1:{proxy.port}/{cluster_vhost}" for proxy in proxies
    )

    async def inject(ctx: FaultContext) -> None:
        busiest = max(proxies, key=lambda p: p.connections)
        ctx.details["connections_cut"] = busiest.connections
        async with FaultWindow(ctx):
            await busiest.cut()
            ctx.ended()
            await asyncio.sleep(CONNECTION_CUT_SECONDS)
            ctx.details["connections_elsewhere"] = sum(
                p.connections for p in proxies if p is not busiest
            )
            busiest.restore()
        if not ctx.details["connections_cut"]:
            ctx.notes.append("no connection went through the proxy that was cut")

    try:
        await cluster_case(
            f"client connections to one node cut {CONNECTION_CUT_SECONDS:.0f}s",
            inject,
            cluster=cluster,
            vhost=cluster_vhost,
            database_url=database_url,
            tmp_path=tmp_path,
            fault_seconds=CONNECTION_CUT_SECONDS,
            flows_within=CONNECTION_CUT_SECONDS,
            services_url=urls,
        )
    finally:
        for proxy in proxies:
            await proxy.close()
