"""What every scenario runs on: its own databases and vhosts, and real processes.

One migrated template database per run (`alembic upgrade head`); each stack gets a copy
(`CREATE DATABASE ... TEMPLATE`) and a RabbitMQ vhost of its own, so no scenario sees
what another left behind. `Harness.close()` stops every process it started and drops
every database and vhost it made, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import asyncpg

from libs.common.broker.topology import Topology
from tests.cluster.nodes import LocalCluster
from tools import launch
from tools.launch import ROOT, ServiceProcess, free_port, wiring

PG_ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBITMQ_BASE_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
STOP_TIMEOUT_SECONDS = 15.0
# A cron that never fires during a run: reconciliation happens only when a scenario asks.
NEVER = "0 0 1 1 *"
# Variables a developer's shell may hold that would change what is measured.
_DROPPED_VARIABLES = ("API_KEYS", "API_SECRET", "DB_POOL_MIN_SIZE", "DB_POOL_MAX_SIZE")


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def database_dsn(name: str) -> str:
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name


def rabbitmqctl(*args: str, attempts: int = 3) -> str:
    """Run rabbitmqctl; retried, since it fails now and then while others use it too."""
    for attempt in range(1, attempts + 1):
        result = subprocess.run(  # noqa: S603 - a fixed local tool with our own arguments
            ["rabbitmqctl", "--quiet", *args],  # noqa: S607 - found on PATH like the tests do
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode == 0:
            return result.stdout
        if attempt < attempts:
            time.sleep(1.0 * attempt)
    raise RuntimeError(
        f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[:500]}"
    )


def _proc_stat(pid: int | str) -> tuple[str, list[str]] | None:
    try:
        head, tail = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
    except OSError:
        return None
    return head.split("(", 1)[1], tail.split()


def _proc_cpu_seconds(pid: int | str, *, with_children: bool = False) -> float:
    stat = _proc_stat(pid)
    if stat is None:
        return 0.0
    fields = stat[1]
    # After the command name: utime, stime, cutime, cstime are fields 14-17 (1-based).
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


# The shared servers, by their command name. Machine-wide: other work on the machine
# shows up here too, so these are indications, not the scenario's own figures.
_SERVERS = {"postgres": "postgres", "beam.smp": "rabbitmq"}


def cpu_seconds(process: ServiceProcess) -> float:
    """User plus system CPU time the process has used so far (0 once it is gone)."""
    return _proc_cpu_seconds(process.pid)


def server_cpu_seconds() -> dict[str, float]:
    """CPU seconds PostgreSQL (every backend, and those already gone) and RabbitMQ used."""
    used = dict.fromkeys(_SERVERS.values(), 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(entry.name)
        if stat is None or stat[0] not in _SERVERS:
            continue
        # A backend's time moves to the postmaster (its parent) when it exits.
        parent_is_server = (_proc_stat(stat[1][1]) or ("",))[0] == stat[0]
        used[_SERVERS[stat[0]]] += _proc_cpu_seconds(entry.name, with_children=not parent_is_server)
    return used


@dataclass
class Stack:
    """One database and one vhost, and the processes started against them."""

    harness: Harness
    database_url: str
    rabbitmq_url: str
    vhost: str
    processes: list[ServiceProcess] = field(default_factory=list)
    gateway_port: int = field(default_factory=free_port)
    provider_port: int = field(default_factory=free_port)
    provider_url: str = ""

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            "APP_ENV": "development",
            "LOG_LEVEL": self.harness.log_level,
            "DATABASE_URL": self.database_url,
            "RABBITMQ_URL": self.rabbitmq_url,
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
            **wiring(
                provider_url=self.provider_url or f"http://127.0.0.1:{self.provider_port}",
                gateway_port=self.gateway_port,
            ),
            # The gateway's per-client limit (100/s by default) would cap every load at 100/s.
            "RATE_LIMIT": "1000000/second",
            "PROVIDER_DECLINE_RATE": "0",
            "PROVIDER_SEED": "1",
            "RECONCILE_CRON": NEVER,
            **overrides,
        }

    async def start_service(
        self,
        name: str,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        **overrides: str,
    ) -> ServiceProcess:
        """`python -m services.<name>` with `env` and `overrides` set, ready-checked."""
        if port is None:
            port = {"gateway": self.gateway_port, "provider": self.provider_port}.get(name)
        port = port or free_port()
        return await self._start(
            name,
            ["-m", f"services.{name}"],
            port,
            self.env(**(env or {}), **overrides),
        )

    async def start_baseline(
        self, mode: str, *args: str, port: int | None = None
    ) -> ServiceProcess:
        """`python -m bench.minimal <mode>`: one of the baselines, ready-checked."""
        port = port or free_port()
        argv = ["-m", "bench.minimal", mode, "--port", str(port), *args]
        return await self._start(f"minimal-{mode}", argv, port, self.env())

    async def _start(
        self, name: str, argv: list[str], port: int, env: dict[str, str]
    ) -> ServiceProcess:
        base = {k: v for k, v in os.environ.items() if k not in _DROPPED_VARIABLES}
        process = launch.start(
            name, env, port=port, log_dir=self.harness.log_dir, argv=argv, base_env=base
        )
        self.processes.append(process)
        self.harness.processes.append(process)
        await process.wait_ready()
        return process

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each running process of the stack, by name, and by
        the shared PostgreSQL and RabbitMQ servers."""
        used: dict[str, float] = {}
        for process in self.processes:
            key = process.name if process.name not in used else f"{process.name}-{process.pid}"
            used[key] = cpu_seconds(process)
        for name, seconds in server_cpu_seconds().items():
            used[f"{name} (machine-wide)"] = seconds
        return used

    @staticmethod
    def cpu_ms_per(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
        """CPU milliseconds each process spent per unit of work between two readings."""
        return {
            name: round((after[name] - before.get(name, 0.0)) * 1000 / max(n, 1), 3)
            for name in after
        }

    async def stop(self, *processes: ServiceProcess) -> None:
        targets = list(processes) or list(reversed(self.processes))
        for name in await launch.stop(targets, STOP_TIMEOUT_SECONDS):
            say(f"{name} did not stop in time; it was killed")
        for process in targets:
            if process in self.processes:
                self.processes.remove(process)

    async def connect(self) -> asyncpg.Connection[Any]:
        return await asyncpg.connect(self.database_url)

    async def queue_depths(self) -> dict[str, int]:
        """Ready messages in every queue of the platform's topology in this vhost.

        Asked over AMQP (a passive declare), which is exact at once; rabbitmqctl's counts
        for quorum queues lag by the statistics interval. Unacknowledged messages are
        work in progress, which the scenarios see in the database instead.
        """
        connection = await self.broker()
        depths: dict[str, int] = {}
        try:
            channel = await connection.channel()
            for spec in Topology().queues:
                for name in (spec.name, spec.parking):
                    queue = await channel.declare_queue(name, passive=True)
                    depths[name] = queue.declaration_result.message_count or 0
        finally:
            await connection.close()
        return depths

    async def broker(self) -> aio_pika.abc.AbstractRobustConnection:
        # On a cluster the services get every node; one is enough to look.
        return await aio_pika.connect_robust(self.rabbitmq_url.split(",")[0])


class Harness:
    """Databases, vhosts and processes for one bench run; `close()` removes them all."""

    def __init__(self, *, log_dir: Path, log_level: str = "INFO") -> None:
        self.run_id = uuid.uuid4().hex[:10]
        self.log_dir = log_dir
        self.log_level = log_level
        self.template: str | None = None
        self.databases: list[str] = []
        self.vhosts: list[str] = []
        self.processes: list[ServiceProcess] = []
        self._stacks = 0
        # Set by the e2e-cluster scenario (bench/cluster.py): stacks made meanwhile get
        # their vhost on that local three-node cluster, and every node in RABBITMQ_URL.
        self.cluster: LocalCluster | None = None

    async def _admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def prepare(self) -> None:
        """Create and migrate the template database every stack copies."""
        name = f"bench_{self.run_id}_tpl"
        await self._admin(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        env = {**os.environ, "DATABASE_URL": database_dsn(name)}
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.template = name

    async def stack(self, label: str) -> Stack:
        """A fresh database (a copy of the template) and a fresh vhost."""
        if self.template is None:
            raise RuntimeError("prepare() first")
        self._stacks += 1
        name = f"bench_{self.run_id}_{self._stacks}_{label}"[:60]
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.databases.append(name)
        if self.cluster is not None:
            await self.cluster.add_vhost(name)
            return Stack(self, database_dsn(name), self.cluster.urls(name), name)
        await asyncio.to_thread(rabbitmqctl, "add_vhost", name)
        self.vhosts.append(name)
        await asyncio.to_thread(
            rabbitmqctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"
        )
        url = RABBITMQ_BASE_URL.rstrip("/") + "/" + quote(name, safe="")
        return Stack(self, database_dsn(name), url, name)

    async def release(self, stack: Stack) -> None:
        """Stop a stack's processes and drop its database and vhost (between scenarios)."""
        await stack.stop()
        db_name = stack.database_url.rsplit("/", 1)[1]
        await self._drop_database(db_name)
        await self._delete_vhost(stack.vhost)

    async def _drop_database(self, name: str) -> None:
        if name in self.databases:
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self.databases.remove(name)

    async def _delete_vhost(self, name: str) -> None:
        if name in self.vhosts:
            await asyncio.to_thread(rabbitmqctl, "delete_vhost", name)
            self.vhosts.remove(name)

    async def close(self) -> None:
        await launch.stop(self.processes, STOP_TIMEOUT_SECONDS)
        # Retried: PostgreSQL may be restarting (other people's fault tests do that).
        for attempt in range(3):
            for name in list(self.databases):
                with contextlib.suppress(OSError, asyncpg.PostgresError):
                    await self._drop_database(name)
            for name in list(self.vhosts):
                with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                    await self._delete_vhost(name)
            if not self.databases and not self.vhosts:
                return
            await asyncio.sleep(2.0 * (attempt + 1))
        say(f"could not remove databases {self.databases} and vhosts {self.vhosts}")
