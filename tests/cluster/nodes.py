"""A three-node RabbitMQ cluster as local processes, for tests and the bench.

Several nodes share one machine the way RabbitMQ's clustering guide describes for a
single host: each has its own node name (`RABBITMQ_NODENAME`), AMQP port
(`RABBITMQ_NODE_PORT`), distribution port (`RABBITMQ_DIST_PORT`), data and log
directories (`RABBITMQ_MNESIA_BASE`, `RABBITMQ_LOG_BASE`) and config file
(`RABBITMQ_CONFIG_FILE`), and all of them one Erlang cookie of their own (`-setcookie`,
and `--erlang-cookie` for the CLI tools). The config is deploy/rabbitmq/cluster.conf,
the compose cluster's, with this cluster's node names in place of the compose ones:
the same peer discovery (classic config) and partition handling (pause_minority).

Nothing here touches the machine's own node (`rabbit@localhost` on 5672) or its
config: the nodes are named `<prefix>-<random>-<letter>@localhost`, listen on ports
`free_port` gives, run under a directory of their own with no plugins (no management
listener), in a process group of their own that is killed by its id at the end. epmd is
shared, which is fine: it maps names to ports, and the names are ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_CONF = ROOT / "deploy" / "rabbitmq" / "cluster.conf"
RABBITMQ_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
START_WITHIN_SECONDS = 120.0
STOP_WITHIN_SECONDS = 60.0
CLI_TIMEOUT_SECONDS = 60.0


def available() -> str | None:
    """Why a local cluster cannot run here, or None."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        return f"no RabbitMQ server scripts in {RABBITMQ_BIN}"
    return None


@dataclasses.dataclass
class Node:
    name: str  # e.g. ci-3f2a1c-a@localhost
    amqp_port: int
    dist_port: int
    home: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def url(self, vhost: str = "/") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/{quote(vhost, safe='')}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def accepts_amqp(self) -> bool:
        """The AMQP listener answers (it is started last, once the node has booted)."""
        try:
            with socket.create_connection(("127.0.0.1", self.amqp_port), timeout=1) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                sock.settimeout(2)
                return sock.recv(1)[:1] == b"\x01"  # the start of connection.start
        except OSError:
            return False


class LocalCluster:
    """`size` nodes under `root`, clustered; `close()` stops them and removes `root`."""

    def __init__(self, root: Path, *, size: int = 3, prefix: str = "ci") -> None:
        self.root = root
        self.run = uuid.uuid4().hex[:6]
        self.cookie = f"cookie-{uuid.uuid4().hex}"
        self.nodes = [
            Node(
                f"{prefix}-{self.run}-{letter}@localhost",
                free_port(),
                free_port(),
                root / letter,
            )
            for letter in "abcdefg"[:size]
        ]
        self.env_file = root / "rabbitmq-env.conf"
        self.config_file = root / "rabbitmq.conf"
        self.plugins_file = root / "enabled_plugins"

    # --- the processes ---------------------------------------------------------------------

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # The machine's /etc/rabbitmq/rabbitmq-env.conf names its own node: not read here.
        self.env_file.write_text("")
        self.plugins_file.write_text("[].\n")
        kept = [
            line
            for line in CLUSTER_CONF.read_text().splitlines()
            if not line.startswith("cluster_formation.classic_config.nodes.")
        ]
        ours = [
            f"cluster_formation.classic_config.nodes.{i} = {node.name}"
            for i, node in enumerate(self.nodes, 1)
        ]
        self.config_file.write_text("\n".join([*kept, *ours, ""]))

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env["RABBITMQ_CONF_ENV_FILE"] = str(self.env_file)
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.amqp_port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_MNESIA_BASE=str(node.home / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.home / "log"),
                RABBITMQ_CONFIG_FILE=str(self.config_file),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.plugins_file),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                    f"-setcookie {self.cookie} -kernel inet_dist_use_interface {{127,0,0,1}}"
                ),
            )
        return env

    def _spawn(self, node: Node) -> None:
        node.home.mkdir(parents=True, exist_ok=True)
        node.starts += 1
        with (node.home / f"server.{node.starts}.log").open("wb") as log:
            node.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self._env(node),
                # Where a crashing node writes its MnesiaCore dump, and nowhere else.
                cwd=node.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: the script's beam (and what beam starts) is
                # killed with it, by this group's id.
                start_new_session=True,
            )

    async def _wait_booted(self, node: Node, within: float = START_WITHIN_SECONDS) -> None:
        deadline = time.monotonic() + within
        while not await asyncio.to_thread(node.accepts_amqp):
            if not node.running:
                raise AssertionError(f"{node.name} exited while starting:\n{self.log_tail(node)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{node.name} not up within {within}s:\n{self.log_tail(node)}")
            await asyncio.sleep(0.2)

    async def start(self) -> None:
        """Start every node and wait until they form one cluster.

        The first node starts alone; the others then find it through peer discovery and
        join it (started all at once, blank nodes may each form a cluster of their own
        before they see one another).
        """
        self._write_config()
        first, *others = self.nodes
        self._spawn(first)
        await self._wait_booted(first)
        for node in others:
            self._spawn(node)
        await asyncio.gather(*(self._wait_booted(node) for node in others))
        await self.wait_clustered()

    async def start_node(self, node: Node) -> float:
        """Start `node` again (same name, data and ports); seconds until it is up."""
        started = time.monotonic()
        if node.running:
            raise AssertionError(f"{node.name} is running already")
        self._spawn(node)
        await self._wait_booted(node)
        await self.wait_clustered()
        return time.monotonic() - started

    def kill(self, node: Node) -> None:
        """SIGKILL the node's whole process group (the script, beam, its helpers)."""
        if node.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=30)

    async def stop_node(self, node: Node) -> None:
        """Stop `node` cleanly (`rabbitmqctl stop`), as an operator does before maintenance."""
        await self.ctl(node, "stop")
        if node.process is not None:
            await asyncio.to_thread(node.process.wait, STOP_WITHIN_SECONDS)

    async def close(self) -> None:
        """Kill every node and remove their data; the logs stay (in a pytest tmp dir)."""
        for node in self.nodes:
            self.kill(node)
            shutil.rmtree(node.home / "mnesia", ignore_errors=True)

    def log_tail(self, node: Node, lines: int = 40) -> str:
        logs = sorted(node.home.glob("server.*.log")) + sorted((node.home / "log").glob("*.log"))
        text = [
            f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
            for p in logs
        ]
        return "\n".join(text)

    # --- the CLI tools ---------------------------------------------------------------------

    async def ctl(
        self, node: Node, *args: str, tool: str = "rabbitmqctl", attempts: int = 3
    ) -> str:
        """`<tool> -n <node> ...` with this cluster's cookie; retried while the CLI itself
        fails to start (it takes a distribution port from a small shared range)."""
        argv = [
            str(RABBITMQ_BIN / tool),
            "--quiet",
            "-n",
            node.name,
            "--erlang-cookie",
            self.cookie,
            *args,
        ]
        for attempt in range(1, attempts + 1):
            result = await asyncio.to_thread(
                subprocess.run,
                argv,
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT_SECONDS,
                check=False,
            )
            if result.returncode == 0:
                return result.stdout
            if attempt < attempts:
                await asyncio.sleep(attempt)
        raise AssertionError(
            f"{tool} {' '.join(args)} on {node.name} failed ({result.returncode}):"
            f" {result.stdout.strip()[-500:]} {result.stderr.strip()[-1000:]}"
        )

    def ctl_command(self, node: Node) -> tuple[str, ...]:
        """The argv prefix that points rabbitmqctl at `node` (for the fault checker)."""
        return (str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.name, "--erlang-cookie", self.cookie)

    async def eval(self, node: Node, expression: str) -> str:
        return (await self.ctl(node, "eval", expression)).strip()

    def any_running(self) -> Node:
        for node in self.nodes:
            if node.running:
                return node
        raise AssertionError("no node of the cluster is running")

    async def running_nodes(self, via: Node | None = None) -> list[str]:
        status = json.loads(
            await self.ctl(via or self.any_running(), "cluster_status", "--formatter", "json")
        )
        return sorted(status["running_nodes"])

    async def wait_clustered(self, within: float = START_WITHIN_SECONDS) -> None:
        """Until every node that runs sees all of them running."""
        want = sorted(node.name for node in self.nodes)
        deadline = time.monotonic() + within
        while True:
            seen = await self.running_nodes()
            if seen == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster not formed within {within}s: {seen} of {want}")
            await asyncio.sleep(0.5)

    # --- what the tests do with it ---------------------------------------------------------

    def urls(self, vhost: str = "/", nodes: list[Node] | None = None) -> str:
        """RABBITMQ_URL for the services: every node, comma-separated."""
        return ",".join(node.url(vhost) for node in (nodes or self.nodes))

    async def add_vhost(self, name: str) -> None:
        node = self.any_running()
        await self.ctl(node, "add_vhost", name)
        await self.ctl(node, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    async def delete_vhost(self, name: str) -> None:
        await self.ctl(self.any_running(), "delete_vhost", name)

    async def quorum_queues(self, vhost: str) -> list[dict[str, Any]]:
        """Every quorum queue of `vhost`: name, leader, members, online."""
        out = await self.ctl(
            self.any_running(),
            "list_queues",
            "-p",
            vhost,
            "name",
            "type",
            "leader",
            "members",
            "online",
            "--formatter",
            "json",
        )
        return [q for q in json.loads(out) if q.get("type") == "quorum"]

    def node_named(self, name: str) -> Node:
        [node] = [n for n in self.nodes if n.name == name]
        return node

    async def partition(self, node: Node) -> None:
        """Cut `node` off from the others at the Erlang distribution layer.

        It uses a wrong cookie for each of them from now on and drops its connections to
        them, so neither side can connect to the other again (each handshake is
        refused) while the CLI, which is not one of them, still reaches every node. To
        the cluster this is a partition that is detected at once: the others see the
        node down, and the node, alone, is the minority.
        """
        others = [f"'{n.name}'" for n in self.nodes if n is not node]
        await self.eval(
            node,
            f"[begin erlang:set_cookie(N, 'partitioned-{self.run}'),"
            f" erlang:disconnect_node(N) end || N <- [{', '.join(others)}]], ok.",
        )

    async def heal(self, node: Node) -> None:
        """Undo `partition`: the right cookie again, and a ping to each of the others."""
        others = [f"'{n.name}'" for n in self.nodes if n is not node]
        await self.eval(
            node,
            f"[begin erlang:set_cookie(N, erlang:get_cookie()), net_adm:ping(N) end"
            f" || N <- [{', '.join(others)}]], ok.",
        )
