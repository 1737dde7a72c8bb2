"""The stack as users start it: `docker compose up` of the compose file and the Dockerfile.

Every service the compose file names runs for real except Grafana (no Debian package to
build its stand-in from): the cases start the named services but `grafana`, whose
provisioning tests/deploy checks statically. The compose file and the Dockerfile are
used as they are; only the published host ports are set, through the compose file's own
variables, to free ones. The cases run in order on one project (`stack`), except those
that need a project of their own (a fresh `up -d gateway`, and the kills under load,
whose checker reads the whole database).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import yaml

from libs.common.broker.topology import Topology
from tests.compose import harness
from tests.compose.conftest import COMPOSE_FILE, FIGURES
from tests.e2e.test_readme_walkthrough import (
    ID_PLACEHOLDER,
    REFERENCE_PLACEHOLDER,
    provider_hold,
    walkthrough_blocks,
)
from tests.faults.harness import Checker, FaultContext, Load, check_invariants
from tests.support import free_port

SERVICES: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
# Grafana has no stand-in: every other service runs.
RUNNING = [name for name in SERVICES if name != "grafana"]
LONG_RUNNING = [name for name in RUNNING if name != "migrate"]
APP = [name for name in RUNNING if SERVICES[name].get("build") == "."]
APP_PORTS = {name: SERVICES[name]["environment"]["PORT"] for name in APP if name != "migrate"}
CONSUMERS = ("payments", "webhooks", "reconciler")
FINAL = ("completed", "failed")

pytestmark = pytest.mark.timeout(600)


class Stack:
    """The main project and what reaches it from the host."""

    def __init__(self, project: harness.Project, ports: dict[str, int]) -> None:
        self.project = project
        self.ports = ports

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports['GATEWAY_HOST_PORT']}"

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{self.ports['PROMETHEUS_HOST_PORT']}"

    def exec(
        self, service: str, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.project.compose("exec", "-T", service, *argv, check=check, timeout=120)


def host_ports() -> dict[str, int]:
    return {
        name: free_port()
        for name in (
            "GATEWAY_HOST_PORT",
            "RABBITMQ_MANAGEMENT_HOST_PORT",
            "PROMETHEUS_HOST_PORT",
            "GRAFANA_HOST_PORT",
        )
    }


_stack: list[Stack] = []


@pytest.fixture(scope="module")
def project(dockerd: harness.Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = host_ports()
    env = {k: str(v) for k, v in ports.items()}
    made = harness.Project(
        dockerd, f"pp{uuid.uuid4().hex[:6]}", COMPOSE_FILE, env, tmp_path_factory.mktemp("p")
    )
    try:
        yield Stack(made, ports)
    finally:
        made.close()


@pytest.fixture
def stack(project: Stack) -> Stack:
    if not _stack:
        pytest.fail("the stack never came up (see the cold start case)")
    return project


# --- HTTP from the host ----------------------------------------------------------------------


async def pay(http: aiohttp.ClientSession, url: str, customer: str = "compose") -> dict[str, Any]:
    async with http.post(
        f"{url}/api/payments/pay",
        json={"amount": "10.00", "customer_id": customer, "description": "compose test"},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    ) as response:
        body: dict[str, Any] = await response.json()
        assert response.status == 202, body
        return body


async def status_of(http: aiohttp.ClientSession, url: str, payment_id: str) -> str | None:
    async with http.get(f"{url}/api/payments/{payment_id}") as response:
        if response.status != 200:
            return None
        found: str = (await response.json())["status"]
        return found


async def wait_final(
    http: aiohttp.ClientSession, url: str, ids: list[str], within: float = 90
) -> dict[str, str | None]:
    deadline = time.monotonic() + within
    while True:
        statuses = {i: await status_of(http, url, i) for i in ids}
        if all(s in FINAL for s in statuses.values()) or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.5)


# --- the cases, in order ---------------------------------------------------------------------


@pytest.mark.timeout(900)
async def test_cold_up_to_healthy_then_first_completed_payment(project: Stack) -> None:
    """The app image was built in the session's set-up (FIGURES has its time): its
    layers are what `--build` finds here."""
    started = time.monotonic()
    await asyncio.to_thread(project.project.up, *RUNNING, args=["--build"])
    await asyncio.to_thread(project.project.wait_healthy, RUNNING, within=300)
    healthy = time.monotonic()
    FIGURES["up -d --build to every service healthy and migrate exited 0, s"] = healthy - started
    _stack.append(project)

    async with aiohttp.ClientSession() as http:
        # One in ten is declined by default: the first *completed* one is what is timed.
        while True:
            payment = await pay(http, project.gateway)
            statuses = await wait_final(http, project.gateway, [payment["id"]], within=60)
            if statuses[payment["id"]] == "completed":
                break
            assert statuses[payment["id"]] == "failed", statuses
    FIGURES["healthy to first completed payment, s"] = time.monotonic() - healthy
    FIGURES["up -d --build to first completed payment, s"] = time.monotonic() - started


def test_app_containers_run_as_non_root_and_expose_their_own_port(stack: Stack) -> None:
    for name, port in APP_PORTS.items():
        [container, *_] = stack.project.containers(name)
        info = stack.project.inspect(container)
        uid = stack.exec(name, "id", "-u").stdout.strip()
        assert uid not in ("", "0"), f"{name} runs as root"
        assert info["Config"]["User"] not in ("", "root", "0")
        exposed = set(info["Config"].get("ExposedPorts") or {})
        assert exposed == {f"{port}/tcp"}, f"{name} listens on {port} but exposes {exposed}"


async def test_readme_walkthrough_verbatim(stack: Stack, tmp_path: Path) -> None:
    blocks = walkthrough_blocks()
    hold, pay_block, stats, payload, sign_and_send, with_paymentsctl = blocks
    assert provider_hold(hold)
    env = {
        **stack.project.shell_env(),
        "PATH": f"{stack.project.shim_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "PAYMENTS_URL": stack.gateway,
    }

    def run_block(block: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [
                "bash",
                "-euo",
                "pipefail",
                "-c",
                block.replace("http://localhost:3000", stack.gateway),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
        return result

    def last_json(output: str) -> Any:
        return json.loads(output.strip().splitlines()[-1])

    try:
        run_block(hold)
        await asyncio.to_thread(stack.project.wait_healthy, ["provider", "migrate"], within=120)
        payment = last_json(run_block(pay_block).stdout)
        assert payment["status"] == "pending"
        assert "payments" in last_json(run_block(stats).stdout)
        run_block(
            payload.replace(ID_PLACEHOLDER, payment["id"]).replace(
                REFERENCE_PLACEHOLDER, payment["reference"]
            )
        )
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            # README: a moment later it is `processing`: the provider holds the charge.
            while await status_of(http, stack.gateway, payment["id"]) != "processing":
                assert time.monotonic() < deadline, "the payment never became processing"
                await asyncio.sleep(0.3)
            sent = run_block(sign_and_send)
            assert sent.stdout.startswith("Signature: ")
            receipt = last_json(sent.stdout)
            assert (receipt["received"], receipt["verified"]) == (True, True)
            statuses = await wait_final(http, stack.gateway, [payment["id"]], within=30)
            assert statuses[payment["id"]] == "completed", statuses
        for line in with_paymentsctl.strip().splitlines():
            run_block(line)
    finally:
        # README: `docker compose up -d provider` puts the default back.
        stack.project.up("provider")
    await asyncio.to_thread(stack.project.wait_healthy, ["provider"], within=120)


async def test_every_paymentsctl_command_from_inside_the_image(stack: Stack) -> None:
    def ctl(*argv: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [harness.COMPOSE, "exec", "-T", "gateway", "paymentsctl", *argv],
            env=stack.project.env,
            cwd=COMPOSE_FILE.parent,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, (
            f"paymentsctl {' '.join(argv)}\n{result.stdout}{result.stderr}"
        )
        return result.stdout

    assert "COMMAND" in ctl("--help")
    paid = json.loads(ctl("--json", "pay", "--amount", "5.00", "--customer", "ctl-in-image"))
    ctl("stats")
    async with aiohttp.ClientSession() as http:
        await wait_final(http, stack.gateway, [paid["id"]], within=60)
        async with http.get(f"{stack.gateway}/api/payments/{paid['id']}") as response:
            payment = await response.json()
    ctl("payments", "get", paid["id"])
    ctl("payments", "list", "--customer", "ctl-in-image")
    webhook = json.dumps(
        {
            "event_type": "payment.completed",
            "payment_id": payment["id"],
            "provider": "test_provider",
            "data": {"reference": payment["reference"]},
        }
    )
    assert "webhook-signature" in ctl("webhook", "sign", "-", stdin=webhook).lower()
    assert "received" in ctl("webhook", "send", "-", stdin=webhook)
    ctl("reconcile")

    # A message that is no message: the payments service parks it at once.
    broker = f"amqp://payments:payments@{stack.project.ip('rabbitmq')}:5672/"
    connection = await aio_pika.connect(broker)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Topology().exchange)
        await exchange.publish(
            aio_pika.Message(b"not a message", message_id="compose-undecodable"),
            routing_key="payment.requested",
            mandatory=True,
        )
    deadline = time.monotonic() + 30
    while "compose-undecodable" not in ctl("dlq", "list"):
        assert time.monotonic() < deadline, "the message was never parked"
        await asyncio.sleep(0.5)
    assert "compose-undecodable" in ctl("dlq", "show", "payment-requested", "compose-undecodable")
    ctl("dlq", "replay", "payment-requested", "compose-undecodable")
    deadline = time.monotonic() + 30
    while "compose-undecodable" not in ctl("dlq", "list", "payment-requested"):
        assert time.monotonic() < deadline, "the replayed message was not parked again"
        await asyncio.sleep(0.5)
    ctl("dlq", "purge", "payment-requested", "--all", "--yes")
    assert "compose-undecodable" not in ctl("dlq", "list")


def test_gateway_logs_show_one_access_line_per_request(stack: Stack) -> None:
    lines = [
        json.loads(line.split("| ", 1)[1])
        for line in stack.project.logs("gateway").splitlines()
        if "| {" in line
    ]
    access = [line for line in lines if line.get("logger") == "access"]
    pays = [line for line in access if line["route"] == "/api/payments/pay"]
    assert pays, f"no access line for /api/payments/pay among {len(lines)} lines"
    assert {"method", "status", "duration_ms", "client", "correlation_id"} <= set(pays[0])
    assert pays[0]["status"] == 202


async def test_scale_payments_to_three_all_consume_and_prometheus_finds_them(stack: Stack) -> None:
    await asyncio.to_thread(stack.project.up, "payments", args=["--scale", "payments=3"])
    await asyncio.to_thread(stack.project.wait_healthy, ["payments"], within=120)
    replicas = stack.project.containers("payments")
    assert len(replicas) == 3
    async with aiohttp.ClientSession() as http:
        paid = await asyncio.gather(*(pay(http, stack.gateway, f"scale-{i}") for i in range(45)))
        statuses = await wait_final(http, stack.gateway, [p["id"] for p in paid], within=90)
        assert all(s in FINAL for s in statuses.values()), statuses

        consumed = {}
        for container in replicas:
            ip = next(
                iter(stack.project.inspect(container)["NetworkSettings"]["Networks"].values())
            )
            async with http.get(f"http://{ip['IPAddress']}:9101/metrics") as response:
                text = await response.text()
            consumed[container[:12]] = sum(
                float(m.group(1))
                for m in re.finditer(
                    r'^messages_consumed_total\{[^}]*queue="[^"]*payment-requested"[^}]*\} (\S+)$',
                    text,
                    re.M,
                )
            )
        assert all(n > 0 for n in consumed.values()), f"not every replica consumed: {consumed}"

        deadline = time.monotonic() + 60
        while True:
            async with http.get(f"{stack.prometheus}/api/v1/targets") as response:
                targets = (await response.json())["data"]["activeTargets"]
            found = [t for t in targets if t["labels"]["job"] == "payments"]
            if len(found) == 3 and all(t["health"] == "up" for t in found):
                break
            assert time.monotonic() < deadline, f"Prometheus found {found}"
            await asyncio.sleep(1)
    FIGURES["payments consumed by the least busy replica (of 45 + earlier)"] = min(
        consumed.values()
    )


async def test_prometheus_targets_all_up_and_rules_loaded(stack: Stack) -> None:
    alerts = yaml.safe_load((harness.ROOT / "deploy/prometheus/alerts.yml").read_text())
    expected = {r["alert"] for group in alerts["groups"] for r in group["rules"] if "alert" in r}
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 60
        while True:
            async with http.get(f"{stack.prometheus}/api/v1/targets") as response:
                targets = (await response.json())["data"]["activeTargets"]
            jobs = {t["labels"]["job"] for t in targets}
            down = [t["scrapeUrl"] for t in targets if t["health"] != "up"]
            if not down and jobs >= {*APP_PORTS, "prometheus"}:
                break
            assert time.monotonic() < deadline, f"targets down: {down}, jobs {jobs}"
            await asyncio.sleep(1)
        async with http.get(f"{stack.prometheus}/api/v1/rules") as response:
            groups = (await response.json())["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert loaded == expected


async def accept_with_consumers_stopped(stack: Stack, n: int) -> list[str]:
    await asyncio.to_thread(stack.project.compose, "stop", *CONSUMERS)
    async with aiohttp.ClientSession() as http:
        paid = await asyncio.gather(*(pay(http, stack.gateway, f"held-{i}") for i in range(n)))
    return [p["id"] for p in paid]


async def everything_back(stack: Stack, ids: list[str]) -> None:
    await asyncio.to_thread(stack.project.up, *RUNNING)
    await asyncio.to_thread(stack.project.wait_healthy, RUNNING, within=180)
    async with aiohttp.ClientSession() as http:
        statuses = await wait_final(http, stack.gateway, ids, within=120)
    missing = {i: s for i, s in statuses.items() if s not in FINAL}
    assert not missing, f"{len(missing)} of {len(ids)} accepted payments lost or stuck: {missing}"


async def test_payments_accepted_while_consumers_stopped_survive_down_and_up(stack: Stack) -> None:
    ids = await accept_with_consumers_stopped(stack, 20)
    await asyncio.to_thread(stack.project.down, volumes=False)
    await everything_back(stack, ids)


async def test_payments_accepted_survive_a_recreated_rabbitmq(stack: Stack) -> None:
    ids = await accept_with_consumers_stopped(stack, 20)
    await asyncio.to_thread(stack.project.up, "rabbitmq", args=["--force-recreate", "--no-deps"])
    await everything_back(stack, ids)


async def test_payments_stored_and_queued_survive_a_recreated_postgres(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        stored = [(await pay(http, stack.gateway, f"stored-{i}"))["id"] for i in range(10)]
        await wait_final(http, stack.gateway, stored, within=60)
    queued = await accept_with_consumers_stopped(stack, 10)
    await asyncio.to_thread(stack.project.up, "postgres", args=["--force-recreate", "--no-deps"])
    await everything_back(stack, stored + queued)


def grace_seconds(service: str) -> float:
    text = str(SERVICES[service].get("stop_grace_period", "10s"))
    return float(text.rstrip("s"))


def test_stop_of_each_service_exits_0_well_inside_its_grace_period(stack: Stack) -> None:
    """Dependents first, as `docker compose down` does. The last case of the main project."""
    order = ["gateway", *CONSUMERS, "provider", "prometheus", "rabbitmq", "postgres"]
    assert set(order) == set(LONG_RUNNING)
    took = {}
    for service in order:
        grace = grace_seconds(service)
        containers = stack.project.containers(service)
        started = time.monotonic()
        stack.project.compose("stop", "-t", str(int(grace)), service, timeout=grace + 60)
        took[service] = time.monotonic() - started
        for container in containers:
            state = stack.project.inspect(container)["State"]
            # 0 is a clean exit; PostgreSQL answers SIGINT (its stop signal) with 0 too.
            assert state["ExitCode"] == 0, f"{service} exited {state['ExitCode']}"
        assert took[service] < grace / 2, f"{service} took {took[service]:.1f}s of {grace}s"
    FIGURES["slowest stop, s"] = max(took.values())
    stack.project.close()  # the main project is done: free the CPU for the next ones


@pytest.fixture(scope="module")
def second(
    dockerd: harness.Dockerd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[harness.Project, dict[str, int]]]:
    """A fresh project: `up -d gateway` first, then the kills under load (its checker reads
    every payment in the database, so none but its own may be there)."""
    ports = host_ports()
    env = {
        **{k: str(v) for k, v in ports.items()},
        # As the fault suite runs them: settling fast, reconciling only when asked.
        "PROVIDER_WEBHOOK_DELAY_MS": "100",
        "RECONCILE_CRON": "0 0 1 1 *",
        "RECONCILE_MIN_AGE_SECONDS": "1",
    }
    made = harness.Project(
        dockerd, f"pk{uuid.uuid4().hex[:6]}", COMPOSE_FILE, env, tmp_path_factory.mktemp("k")
    )
    try:
        yield made, ports
    finally:
        made.close()


def test_up_gateway_in_a_fresh_project_starts_exactly_what_it_needs(
    second: tuple[harness.Project, dict[str, int]],
) -> None:
    def needs(name: str) -> set[str]:
        direct = set(SERVICES[name].get("depends_on", {}))
        return direct.union(*(needs(d) for d in direct))

    fresh, _ = second
    fresh.up("gateway")
    started = {fresh.service_of(c) for c in fresh.containers()}
    assert started == {"gateway", *needs("gateway")}
    fresh.wait_healthy(sorted(started), within=180)


async def test_docker_kill_of_each_consumer_under_load_loses_and_doubles_nothing(
    second: tuple[harness.Project, dict[str, int]], dockerd: harness.Dockerd
) -> None:
    killed, ports = second
    checker: Checker | None = None
    try:
        await asyncio.to_thread(killed.up, *RUNNING)
        await asyncio.to_thread(killed.wait_healthy, RUNNING, within=240)
        db = f"postgresql://admin:password123@{killed.ip('postgres')}:5432/payment_api"
        broker = f"amqp://payments:payments@{killed.ip('rabbitmq')}:5672/"
        checker = Checker(
            db,
            broker,
            rabbitmqctl=[
                "env",
                f"DOCKER_HOST=unix://{dockerd.socket}",
                harness.DOCKER,
                "exec",
                killed.containers("rabbitmq")[0],
                "rabbitmqctl",
            ],
        )
        gateway = f"http://127.0.0.1:{ports['GATEWAY_HOST_PORT']}"
        platform = ComposePlatform(killed)
        async with aiohttp.ClientSession() as http:
            load = Load(http, gateway, checker)
            ctx = FaultContext(platform=platform, load=load)
            load.start(duration=12.0)
            await asyncio.sleep(2.0)
            ctx.began()
            for consumer in CONSUMERS:
                for container in killed.containers(consumer):
                    await asyncio.to_thread(dockerd.docker, "kill", container)
                # A killed container counts as stopped by hand: no restart policy brings it
                # back. The operator's `docker compose start` does.
                await asyncio.sleep(1.0)
                await asyncio.to_thread(killed.compose, "start", consumer)
                await asyncio.sleep(1.5)
            ctx.ended()
            await load.finish()
            row, problems = await check_invariants(
                "docker kill payments, webhooks, reconciler", platform, checker, load, ctx
            )
        FIGURES["kill case: payments answered 2xx"] = row.answered
        FIGURES["kill case: lost"] = row.lost
        FIGURES["kill case: duplicates"] = row.duplicates
        assert not problems, problems
        assert row.answered > 100
    finally:
        if checker is not None:
            await checker.close()


class ComposePlatform:
    """What the fault suite's `check_invariants` asks of a platform: is everything ready."""

    def __init__(self, project: harness.Project) -> None:
        self.project = project

    async def check_ready(self, within: float = 60.0) -> list[str]:
        try:
            await asyncio.to_thread(self.project.wait_healthy, RUNNING, within=within)
        except AssertionError as exc:
            return [str(exc)]
        return []
