"""Fault injection against the real platform: a steady client load, a fault, the invariants.

A case starts every service as a real process (`tests.e2e.stack.Stack`), drives a bounded
load at the gateway like real clients and a real PSP would, injects one fault mid-load,
stops the load, lets the system settle, and then checks what README promises:

- every payment answered 2xx is stored, exactly once, under the id of its answer; no
  idempotency key has more than one payment (a key that never got a 2xx may have one:
  the client retried it and it is allowed to have gone through);
- the provider holds exactly one charge per payment, and every payment ended where its
  charge did (succeeded: completed; declined: failed);
- every webhook event is stored once and applied at most once; every webhook the gateway
  answered 2xx (the provider's, and the seed-signed resends) is stored;
- once settled, the queues are empty, nothing is left unacked, nothing was parked;
- the services that were not restarted answer /ready by themselves.

The load: ~20 `POST /api/payments/pay` a second, each with its own Idempotency-Key, each
retried with the same key on 409/429/5xx or a connection error until it gets a 2xx or
its deadline passes (a 5xx other than 503 is still reported: 503 is the only "retry"
the gateway promises); a stream of seed-signed resends of webhooks the provider already
delivered; and, where the reconciler is the target, reconciliation requests. Settling
may ask the reconciler for runs, as an operator would, for payments whose webhook is
still in the provider's backoff (or whose charge the provider never got); the table
counts them.

Recovery: from the end of the fault (the server is back, the connection restored, the
stopped service being started again) until a payment accepted from then on is
completed or failed; probe payments, one a second, measure it.

"lost" counts payments answered 2xx and not stored, plus webhooks answered 2xx and not
stored. Each case becomes one row of the table `RESULTS` collects (printed at the end
of the session by tests/faults/test_faults.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import aiohttp
import asyncpg

from libs.common.broker.topology import Topology
from libs.common.db import is_transient
from libs.common.signing import SEED_HEADER, seed_signature
from tests.e2e.processes import ServiceProcess, running_services, start_service
from tests.e2e.stack import Stack
from tests.support import free_port, rabbitmqctl

log = logging.getLogger(__name__)

TOPOLOGY = Topology()  # what the services use
SECRET = "webhook-secret-key"  # the development default every service reads
FINAL = ("completed", "failed", "refunded")

# The load.
PAYMENTS_PER_SECOND = 20
LOAD_SECONDS = 6.0
FAULT_AT_SECONDS = 2.0
WEBHOOK_RESENDS_PER_SECOND = 5
# How long a client keeps retrying one request with its key before it gives up.
REQUEST_DEADLINE_SECONDS = 45.0
REQUEST_TIMEOUT_SECONDS = 10.0
RETRIED_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
# After the load: how long everything may take to settle, and when to ask the reconciler.
SETTLE_SECONDS = 45.0
RECONCILE_AFTER_SECONDS = 6.0
PROBE_WITHIN_SECONDS = 45.0
PROBE_EVERY_SECONDS = 1.0
# Final checks that fail are looked at again this many times, a second apart.
INSPECTIONS = 5

# Started together: none needs another to start, only to work.
SERVICES = ("provider", "payments", "webhooks", "reconciler", "gateway")
CONSUMERS = ("payments", "webhooks", "reconciler")
SERVICE_ENV: dict[str, dict[str, str]] = {
    # Charges settle fast and are announced by real signed webhooks; the seed makes the
    # declines of a run repeatable.
    "provider": {
        "PROVIDER_WEBHOOK_DELAY_MS": "100",
        "PROVIDER_DECLINE_RATE": "0.1",
        "PROVIDER_SEED": "20261126",
    },
    # Runs happen only when asked for (this schedule never fires during a test), and they
    # look at every payment older than a second.
    "reconciler": {"RECONCILE_CRON": "0 0 1 1 *", "RECONCILE_MIN_AGE_SECONDS": "1"},
    # Clients retrying after an outage come in bursts; the limit is not under test here.
    "gateway": {"RATE_LIMIT": "100000/second"},
}

RESULTS: list[FaultRow] = []


# --- what a case reports -----------------------------------------------------------------------


@dataclasses.dataclass
class FaultRow:
    fault: str
    requests: int
    answered: int
    stored: int
    duplicates: int
    lost: int
    webhooks_answered: int
    reconcile_runs: int
    recovery_seconds: float | None
    fault_seconds: float | None = None
    passed: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "fault",
        "fault s",
        "requests sent",
        "2xx answered",
        "payments stored",
        "duplicates",
        "lost",
        "webhooks 2xx",
        "reconcile runs to settle",
        "recovery s",
    )

    def cells(self) -> list[str]:
        recovery = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.1f}"
        lasted = "-" if self.fault_seconds is None else f"{self.fault_seconds:.1f}"
        return [
            self.fault + ("" if self.passed else " (FAILED)"),
            lasted,
            str(self.requests),
            str(self.answered),
            str(self.stored),
            str(self.duplicates),
            str(self.lost),
            str(self.webhooks_answered),
            str(self.reconcile_runs),
            recovery,
        ]


def markdown_table(rows: list[FaultRow]) -> str:
    lines = [
        "| " + " | ".join(FaultRow.COLUMNS) + " |",
        "|" + "|".join("---" for _ in FaultRow.COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def record(row: FaultRow) -> None:
    """Keep the row for the session's table, and in FAULT_REPORT (JSON) when it is set."""
    RESULTS.append(row)
    report = os.environ.get("FAULT_REPORT")
    if report:
        rows = [dataclasses.asdict(r) for r in RESULTS]
        Path(report).write_text(json.dumps(rows, indent=2) + "\n")


# --- the servers themselves ------------------------------------------------------------------


def _postgres_cluster() -> tuple[str, str, Path]:
    """(version, name, data directory) of the machine's cluster on port 5432."""
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    for line in listing.splitlines():
        version, name, port, _status, _owner, data, *_ = line.split()
        if port == "5432":
            return version, name, Path(data)
    raise AssertionError(f"no PostgreSQL cluster on port 5432:\n{listing}")


def _pg_ctlcluster(action: str) -> None:
    version, name, _ = _postgres_cluster()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _postgres_is_up() -> bool:
    result = subprocess.run(
        ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], check=False, timeout=30
    )
    return result.returncode == 0


def _postgres_pids() -> list[int]:
    """The postmaster first, then every process it started."""
    _, _, data = _postgres_cluster()
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["pgrep", "-P", str(postmaster)], check=False, capture_output=True, text=True, timeout=30
    ).stdout.split()
    return [postmaster, *(int(pid) for pid in children)]


def _signal_all(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def ensure_postgres_running() -> None:
    """Whatever happened, leave the cluster running and not paused."""
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        _signal_all(_postgres_pids(), signal.SIGCONT)
    if not _postgres_is_up():
        with contextlib.suppress(subprocess.CalledProcessError):
            _pg_ctlcluster("start")
    for _ in range(120):
        if _postgres_is_up():
            return
        time.sleep(0.5)
    raise AssertionError("PostgreSQL did not come back")


def ensure_rabbitmq_running() -> None:
    """Leave RabbitMQ running, with the supervisor its quorum queues' dead-lettering needs.

    RabbitMQ 3.10 loses `rabbit_fifo_dlx_sup` for good when dead-letter workers keep
    crashing just after a start (quorum queues being deleted meanwhile, say by another
    session removing its vhost); from then on every `x-dead-letter-strategy:
    at-least-once` queue fails to start and clients get INTERNAL_ERROR. Restarting that
    one supervisor repairs it without another restart.
    """
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    missing = subprocess.run(
        ["rabbitmqctl", "--quiet", "eval", "whereis(rabbit_fifo_dlx_sup)."],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    if missing == "undefined":
        log.warning("RabbitMQ lost rabbit_fifo_dlx_sup; restarting it")
        rabbitmqctl("eval", "supervisor:restart_child(rabbit_sup, rabbit_fifo_dlx_sup).")


async def restart_postgres() -> None:
    """`pg_ctlcluster … restart` (fast shutdown: every connection is cut)."""
    try:
        await asyncio.to_thread(_pg_ctlcluster, "restart")
    finally:
        await asyncio.to_thread(ensure_postgres_running)


@contextlib.asynccontextmanager
async def postgres_paused() -> AsyncIterator[None]:
    """Every process of the cluster stopped (SIGSTOP) inside the block, continued after."""
    try:
        # The postmaster first, so that it starts no new backend meanwhile.
        postmaster, *_ = await asyncio.to_thread(_postgres_pids)
        os.kill(postmaster, signal.SIGSTOP)
        _signal_all(await asyncio.to_thread(_postgres_pids), signal.SIGSTOP)
        yield
    finally:
        await asyncio.to_thread(ensure_postgres_running)


async def restart_rabbitmq() -> None:
    """`rabbitmqctl stop_app`, then `start_app`: every connection is closed meanwhile."""
    try:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        await asyncio.to_thread(rabbitmqctl, "start_app")
    finally:
        await asyncio.to_thread(ensure_rabbitmq_running)


def url_via(url: str, port: int) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port` (a proxy's)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}"))


# --- looking at the system from outside ---------------------------------------------------------


def _db_unavailable(exc: BaseException) -> bool:
    return is_transient(exc, connection_closed=isinstance(exc, asyncpg.InterfaceError))


class Checker:
    """Reads the database and the broker, riding out their outages."""

    def __init__(
        self, database_url: str, rabbitmq_url: str, *, rabbitmqctl: Sequence[str] = ("rabbitmqctl",)
    ) -> None:
        self.database_url = database_url
        self.rabbitmq_url = rabbitmq_url
        # How to reach the broker's rabbitmqctl: a container's (`docker exec … rabbitmqctl`),
        # or a cluster node's with its name and cookie.
        self.rabbitmqctl = tuple(rabbitmqctl)
        self.vhost = unquote(urlsplit(rabbitmq_url).path.lstrip("/")) or "/"
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    async def fetch(
        self, sql: str, *args: Any, within: float = 30.0, each: float = 5.0
    ) -> list[asyncpg.Record]:
        """Rows of `sql`, retried for `within` seconds while the database is away."""
        deadline = time.monotonic() + within
        while True:
            try:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.database_url, min_size=0, max_size=4, timeout=each
                    )
                async with asyncio.timeout(each):
                    return await self._pool.fetch(sql, *args)
            except Exception as exc:
                if not _db_unavailable(exc):
                    raise
                # A restarted server leaves the pool's connections dead: start afresh.
                await self.close()
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def fetchval(self, sql: str, *args: Any, within: float = 30.0) -> Any:
        rows = await self.fetch(sql, *args, within=within)
        return rows[0][0] if rows else None

    async def ready_messages(self) -> dict[str, int] | None:
        """Messages waiting in each queue (passive declare), or None if the broker is away."""
        names = [n for spec in TOPOLOGY.queues for n in (spec.name, spec.parking)]
        try:
            async with asyncio.timeout(10):
                connection = await aio_pika.connect(self.rabbitmq_url)
                async with connection:
                    channel = await connection.channel()
                    counts = {}
                    for name in names:
                        queue = await channel.declare_queue(name, passive=True)
                        counts[name] = queue.declaration_result.message_count or 0
                    return counts
        except (aio_pika.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            log.info("queues not inspected: %r", exc)
            return None

    async def unacked_messages(self) -> dict[str, int]:
        """Messages delivered and not acked yet, per queue (rabbitmqctl sees them)."""

        def list_queues() -> str:
            return subprocess.run(
                [
                    *self.rabbitmqctl,
                    "--quiet",
                    "list_queues",
                    "-p",
                    self.vhost,
                    "name",
                    "messages_unacknowledged",
                    "--formatter",
                    "json",
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout

        queues = json.loads(await asyncio.to_thread(list_queues))
        return {q["name"]: int(q["messages_unacknowledged"] or 0) for q in queues}

    async def delivered_webhook_bodies(self) -> list[bytes]:
        rows = await self.fetch(
            "SELECT body FROM provider.webhook_deliveries WHERE state = 'delivered'"
            " ORDER BY delivered_at DESC LIMIT 50",
            within=2.0,
            each=2.0,
        )
        return [r["body"] for r in rows]

    async def final_among(self, ids: list[str]) -> bool:
        settled = await self.fetchval(
            "SELECT count(*) FROM payments.payments"
            " WHERE id = ANY($1::uuid[]) AND status = ANY($2)",
            ids,
            list(FINAL),
            within=2.0,
        )
        return bool(settled)


# --- the load ----------------------------------------------------------------------------------


@dataclasses.dataclass
class PayRequest:
    key: str
    body: dict[str, Any]
    probe: bool = False
    attempts: int = 0
    payment_id: str | None = None
    # A status no client retries (a 4xx): the request failed for good.
    refused: str | None = None


class Load:
    """Clients of the gateway: payments, webhook resends, reconciliation requests, probes."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        gateway_url: str,
        checker: Checker,
        *,
        reconcile_every: float | None = None,
    ) -> None:
        self.http = http
        self.gateway_url = gateway_url
        self.checker = checker
        self.reconcile_every = reconcile_every
        self.requests: list[PayRequest] = []
        self.answers: collections.Counter[str] = collections.Counter()
        self.webhooks_sent = 0
        self.webhooks_answered = 0
        self.webhook_events: set[str] = set()
        self.webhooks_refused: list[str] = []
        # 503s that did not say when to retry (README promises Retry-After on each).
        self.unavailable_without_retry_after = 0
        self.reconciliations_requested = 0
        self.reconciliation_runs: list[str] = []
        self.recovery_seconds: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._run = uuid.uuid4().hex[:8]

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        return task

    def start(self, duration: float = LOAD_SECONDS) -> None:
        self._driver = asyncio.create_task(self._drive(duration))

    def fault_ended(self, at: float) -> None:
        """Start probing: how long until a payment accepted from now on settles."""
        if self._probe is None:
            self._probe = asyncio.create_task(self._measure_recovery(at))

    async def finish(self) -> None:
        """Wait until every request got its answer or gave up, and recovery was measured."""
        if self._driver is not None:
            await self._driver
        if self._probe is not None:
            await self._probe
        while self._tasks:
            done, _ = await asyncio.wait(self._tasks)
            self._tasks -= done
            for task in done:
                task.result()

    async def _drive(self, duration: float) -> None:
        started = time.monotonic()
        side = [asyncio.create_task(self._resend_webhooks())]
        if self.reconcile_every is not None:
            side.append(asyncio.create_task(self._request_reconciliations(self.reconcile_every)))
        n = 0
        try:
            while time.monotonic() - started < duration:
                self._spawn(self.pay())
                n += 1
                await asyncio.sleep(max(0.0, started + n / PAYMENTS_PER_SECOND - time.monotonic()))
        finally:
            self._stopped.set()
            await asyncio.gather(*side)

    async def pay(self, *, probe: bool = False) -> PayRequest:
        i = len(self.requests)
        key = f"fault-{self._run}-{'probe' if probe else 'pay'}-{i}"
        request = PayRequest(
            key,
            {
                "amount": f"{1 + i % 500}.{i % 100:02d}",
                "currency": "USD",
                "customer_id": f"fault-customer-{i % 37}",
                "description": "fault injection",
                "metadata": {"fault_key": key},
            },
            probe=probe,
        )
        self.requests.append(request)
        body = await self._post(
            "/api/payments/pay", json.dumps(request.body).encode(), {"Idempotency-Key": key}
        )
        request.attempts = body.pop("_attempts")
        if "_refused" in body:
            request.refused = body["_refused"]
        elif "id" in body:
            request.payment_id = body["id"]
        return request

    async def _post(self, path: str, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """POST until a 2xx or a status no client retries, or the deadline; the JSON answer."""
        deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS
        delay = 0.2
        attempts = 0
        while True:
            attempts += 1
            try:
                async with self.http.post(
                    self.gateway_url + path,
                    data=data,
                    headers={"Content-Type": "application/json", **headers},
                    timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
                ) as response:
                    self.answers[str(response.status)] += 1
                    if response.status == 503 and "Retry-After" not in response.headers:
                        self.unavailable_without_retry_after += 1
                    answer = await response.json(content_type=None)
                    if 200 <= response.status < 300:
                        return {**answer, "_attempts": attempts}
                    if response.status not in RETRIED_STATUSES:
                        refused = f"{response.status} {answer}"
                        return {"_refused": refused, "_attempts": attempts}
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                self.answers[type(exc).__name__] += 1
            if time.monotonic() + delay > deadline:
                return {"_attempts": attempts}
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    async def _resend_webhooks(self) -> None:
        """Seed-signed resends of webhooks the provider delivered: duplicates, all of them."""
        bodies: list[bytes] = []
        last_read = 0.0
        while not self._stopped.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), 1 / WEBHOOK_RESENDS_PER_SECOND)
            if time.monotonic() - last_read > 1.0:
                last_read = time.monotonic()
                with contextlib.suppress(Exception):  # the database may be the fault
                    bodies = await self.checker.delivered_webhook_bodies()
            if bodies:
                self._spawn(self.send_webhook(random.choice(bodies)))

    async def send_webhook(self, raw: bytes) -> None:
        self.webhooks_sent += 1
        answer = await self._post("/api/webhooks", raw, {SEED_HEADER: seed_signature(raw, SECRET)})
        if "event_id" in answer:
            self.webhooks_answered += 1
            self.webhook_events.add(answer["event_id"])
        elif "_refused" in answer:
            self.webhooks_refused.append(answer["_refused"])

    async def _request_reconciliations(self, every: float) -> None:
        while not self._stopped.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), every)
            self._spawn(self.request_reconciliation())

    async def request_reconciliation(self) -> bool:
        answer = await self._post("/api/reconciliations", b"", {})
        if "id" in answer:
            self.reconciliations_requested += 1
            self.reconciliation_runs.append(answer["id"])
            return True
        return False

    async def _measure_recovery(self, fault_end: float) -> None:
        next_probe = time.monotonic()
        while time.monotonic() - fault_end < PROBE_WITHIN_SECONDS:
            if time.monotonic() >= next_probe:
                next_probe += PROBE_EVERY_SECONDS
                self._spawn(self.pay(probe=True))
            probes = [r for r in self.requests if r.probe]
            accepted = [r.payment_id for r in probes if r.payment_id]
            with contextlib.suppress(Exception):  # the database may still be the fault
                if accepted and await self.checker.final_among(accepted):
                    self.recovery_seconds = time.monotonic() - fault_end
                    return
            await asyncio.sleep(0.1)


# --- the platform under test ------------------------------------------------------------------


class Platform:
    """Every service as a process; which ones a fault restarted."""

    def __init__(self, stack: Stack, env: dict[str, str]) -> None:
        self.stack = stack
        self.env = env
        self.current: dict[str, ServiceProcess] = {}
        self.originals: dict[str, ServiceProcess] = {}
        self.restarted: set[str] = set()

    def _env(self, name: str) -> dict[str, str]:
        return {**SERVICE_ENV.get(name, {}), **self.env}

    def _port(self, name: str) -> int:
        """The gateway's and the provider's own port; for the others a fresh one."""
        fixed = {"gateway": self.stack.gateway_port, "provider": self.stack.provider_port}
        return fixed.get(name) or free_port()

    async def _start(self, name: str) -> ServiceProcess:
        port = self._port(name)
        for earlier in self.stack.services:
            if earlier.port == port and earlier.log_path and earlier.log_path.exists():
                # The new process would write over its predecessor's log.
                kept = earlier.log_path.with_suffix(f".{len(self.stack.services)}.log")
                earlier.log_path = earlier.log_path.rename(kept)
        service = start_service(
            name, self.stack.env(**self._env(name)), self.stack.tmp_path, port=port
        )
        self.stack.services.append(service)
        await service.wait_ready()
        return service

    async def start_all(self) -> None:
        started = await asyncio.gather(*(self._start(name) for name in SERVICES))
        for service in started:
            self.current[service.name] = self.originals[service.name] = service

    @property
    def gateway(self) -> ServiceProcess:
        return self.current["gateway"]

    async def restart(self, name: str) -> None:
        self.restarted.add(name)
        self.current[name] = await self._start(name)

    def kill(self, name: str) -> None:
        self.restarted.add(name)
        self.current[name].kill()

    async def terminate(self, name: str) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the process took to exit."""
        self.restarted.add(name)
        service = self.current[name]
        started = time.monotonic()
        service.terminate()
        code = await service.wait_exit(within=60)
        return code, time.monotonic() - started

    async def check_ready(self, within: float = 15.0) -> list[str]:
        """What is wrong: a service not ready, or restarted although the fault spared it."""

        async def check(name: str) -> str | None:
            service = self.current[name]
            if name not in self.restarted and service is not self.originals[name]:
                return f"{name} was restarted"
            if service.process.poll() is not None:
                return f"{name} exited with {service.process.returncode}"
            try:
                await service.wait_ready(within=within)
            except AssertionError:
                return f"{name} is not ready within {within}s"
            return None

        return [p for p in await asyncio.gather(*(check(n) for n in SERVICES)) if p]


@dataclasses.dataclass
class FaultContext:
    """What an injected fault gets: the platform, and a way to say when the fault ended."""

    platform: Platform
    load: Load
    fault_began_at: float | None = None
    fault_ended_at: float | None = None
    # Problems the fault itself revealed (a service that did not exit cleanly, say).
    notes: list[str] = dataclasses.field(default_factory=list)
    # Anything worth keeping in the JSON report.
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def began(self) -> None:
        self.fault_began_at = time.monotonic()

    def ended(self) -> None:
        self.fault_ended_at = time.monotonic()
        self.load.fault_ended(self.fault_ended_at)

    @property
    def fault_seconds(self) -> float | None:
        if self.fault_began_at is None or self.fault_ended_at is None:
            return None
        return self.fault_ended_at - self.fault_began_at


Inject = Callable[[FaultContext], Awaitable[None]]


# --- settling and the invariants -----------------------------------------------------------------


async def settle(checker: Checker, load: Load) -> tuple[bool, int, str]:
    """Wait until every answered payment is stored and settled and the queues are drained.

    Payments whose provider webhook did not come (the provider or the gateway was the
    fault) are settled by asking the reconciler, as an operator would. Returns whether it
    settled, how many runs were asked for, and the last state seen.
    """
    answered = [r.payment_id for r in load.requests if r.payment_id]
    started = time.monotonic()
    ask_reconciler_at = started + RECONCILE_AFTER_SECONDS
    runs = 0
    state = ""
    while True:
        row = (
            await checker.fetch(
                """
                SELECT count(*) FILTER (WHERE status <> ALL($2)) AS unsettled,
                       count(*) FILTER (WHERE id = ANY($1::uuid[])) AS answered_stored,
                       (SELECT count(*) FROM provider.webhook_deliveries d
                         WHERE d.state = 'delivered' AND NOT EXISTS (
                             SELECT 1 FROM webhooks.webhook_events e
                              WHERE e.provider = 'simulated' AND e.provider_event_id = d.id))
                           AS delivered_not_stored,
                       (SELECT count(*) FROM reconciler.reconciliation_logs
                         WHERE id = ANY($3::uuid[])) AS runs_taken_up
                  FROM payments.payments
                """,
                answered,
                list(FINAL),
                load.reconciliation_runs,
            )
        )[0]
        queues = await checker.ready_messages()
        state = (
            f"{row['unsettled']} unsettled, {row['answered_stored']}/{len(answered)} answered"
            f" stored, {row['delivered_not_stored']} delivered webhooks not stored,"
            f" {row['runs_taken_up']}/{len(load.reconciliation_runs)} reconciliation runs"
            f" taken up, queues {queues}"
        )
        if (
            row["unsettled"] == 0
            and row["runs_taken_up"] == len(load.reconciliation_runs)
            and row["answered_stored"] == len(answered)
            and row["delivered_not_stored"] == 0
            and queues is not None
            and not any(queues.values())
        ):
            return True, runs, state
        now = time.monotonic()
        if now - started > SETTLE_SECONDS:
            return False, runs, state
        if now >= ask_reconciler_at and row["unsettled"]:
            log.info("asking the reconciler to settle: %s", state)
            if await load.request_reconciliation():
                runs += 1
            ask_reconciler_at = time.monotonic() + RECONCILE_AFTER_SECONDS
        await asyncio.sleep(0.25)


async def inspect(
    fault: str, platform: Platform, checker: Checker, load: Load, ctx: FaultContext, runs: int
) -> tuple[FaultRow, list[str]]:
    """The case's row, and every broken invariant."""
    problems: list[str] = []
    requests = load.requests
    by_key = {r.key: r for r in requests}
    answered = {r.key: r.payment_id for r in requests if r.payment_id}
    refused = [f"{r.key}: {r.refused}" for r in requests if r.refused]
    if refused:
        problems.append(f"requests refused for good: {refused[:5]}")
    if load.webhooks_refused:
        problems.append(f"webhooks refused: {load.webhooks_refused[:5]}")
    # 503 says "retry"; any other 5xx is an error the platform did not expect.
    errors = {k: n for k, n in load.answers.items() if k.isdigit() and int(k) >= 500 and k != "503"}
    if errors:
        problems.append(f"the gateway answered server errors other than 503: {errors}")
    if load.unavailable_without_retry_after:
        problems.append(f"{load.unavailable_without_retry_after} answers 503 without Retry-After")

    # Payments: the one each 2xx named, and one per key at most.
    payments = await checker.fetch(
        "SELECT id::text AS id, metadata->>'fault_key' AS key FROM payments.payments"
    )
    stored_by_key: dict[str | None, list[str]] = collections.defaultdict(list)
    for p in payments:
        stored_by_key[p["key"]].append(p["id"])
    stored_ids = {p["id"] for p in payments}
    lost = [key for key, pid in answered.items() if pid not in stored_ids]
    duplicated = {k: ids for k, ids in stored_by_key.items() if len(ids) > 1}
    unexplained = [ids for k, ids in stored_by_key.items() if k not in by_key]
    mismatched = {
        k: (answered[k], ids)
        for k, ids in stored_by_key.items()
        if k in answered and answered[k] not in ids
    }
    duplicates = sum(len(ids) - 1 for ids in duplicated.values()) + sum(map(len, unexplained))
    if lost:
        problems.append(f"answered 2xx but not stored: {lost[:5]}")
    if duplicated or unexplained or mismatched:
        problems.append(
            f"payments per key not exactly one: {list(duplicated.items())[:5]},"
            f" no such key: {unexplained[:5]},"
            f" other id than answered: {list(mismatched.items())[:5]}"
        )

    # Charges: exactly one per payment, and the payment ended where its charge did.
    charges = await checker.fetch(
        """
        SELECT p.id::text AS id, p.status, count(c.id) AS charges,
               min(c.status) AS charge_status
          FROM payments.payments p LEFT JOIN provider.charges c ON c.payment_id = p.id
         GROUP BY p.id, p.status
        """
    )
    wrong_charges = [(r["id"], r["charges"]) for r in charges if r["charges"] != 1]
    if wrong_charges:
        problems.append(f"payments without exactly one charge: {wrong_charges[:5]}")
    expected = {"succeeded": "completed", "declined": "failed"}
    disagree = [
        (r["id"], r["status"], r["charge_status"])
        for r in charges
        if r["charges"] == 1 and expected.get(r["charge_status"]) != r["status"]
    ]
    if disagree:
        problems.append(f"payments not settled where their charge is: {disagree[:5]}")
    strays = await checker.fetchval(
        "SELECT count(*) FROM provider.charges c"
        " WHERE NOT EXISTS (SELECT 1 FROM payments.payments p WHERE p.id = c.payment_id)"
    )
    if strays:
        problems.append(f"{strays} charges for payments that do not exist")

    # Webhooks: stored once each, applied at most once, none lost once answered 2xx.
    applied_twice = await checker.fetch(
        "SELECT payment_id, to_status, source, count(*) AS n FROM payments.payment_events"
        " WHERE applied GROUP BY payment_id, to_status, source HAVING count(*) > 1"
    )
    if applied_twice:
        problems.append(
            f"transitions applied more than once: {[tuple(r) for r in applied_twice[:5]]}"
        )
    events_twice = await checker.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM webhooks.webhook_events"
        " GROUP BY provider, provider_event_id HAVING count(*) > 1) AS twice"
    )
    if events_twice:
        problems.append(f"{events_twice} webhook events stored more than once")
    odd_events = await checker.fetch(
        "SELECT status, count(*) AS n FROM webhooks.webhook_events"
        " WHERE status NOT IN ('applied', 'refused') GROUP BY status"
    )
    if odd_events:
        problems.append(
            f"webhook events neither applied nor refused: {[tuple(r) for r in odd_events]}"
        )
    stored_events = {
        r["id"] for r in await checker.fetch("SELECT id::text AS id FROM webhooks.webhook_events")
    }
    webhooks_lost = sorted(load.webhook_events - stored_events)
    delivered = (
        await checker.fetch(
            "SELECT count(*) AS delivered, count(*) FILTER (WHERE NOT EXISTS ("
            "  SELECT 1 FROM webhooks.webhook_events e"
            "   WHERE e.provider = 'simulated' AND e.provider_event_id = d.id)) AS lost"
            " FROM provider.webhook_deliveries d WHERE d.state = 'delivered'"
        )
    )[0]
    delivered_lost = int(delivered["lost"])
    if webhooks_lost or delivered_lost:
        problems.append(
            f"webhooks answered 2xx but not stored: {webhooks_lost[:5]}"
            f" (+{delivered_lost} of the provider's deliveries)"
        )

    # The broker: drained, nothing held unacked, nothing parked.
    queues = await checker.ready_messages()
    if queues is None or any(queues.values()):
        problems.append(f"queues not empty: {queues}")
    unacked = await checker.unacked_messages()
    if any(unacked.values()):
        problems.append(f"messages left unacked: {unacked}")

    if load.recovery_seconds is None:
        problems.append(
            f"no payment accepted after the fault settled within {PROBE_WITHIN_SECONDS}s"
        )

    reconciled = await checker.fetchval(
        "SELECT count(*) FROM payments.payment_events WHERE source = 'reconciler' AND applied"
    )
    # Every run asked for (and answered 202) was taken up. Whether it finished is
    # reported, not asserted: a run cut short and redelivered while another run holds the
    # lock is recorded `skipped`, which leaves the first attempt's row `running`.
    requested_runs = {
        r["id"]: r["status"]
        for r in await checker.fetch(
            "SELECT id::text AS id, status FROM reconciler.reconciliation_logs"
            " WHERE id = ANY($1::uuid[])",
            load.reconciliation_runs,
        )
    }
    never_run = [r for r in load.reconciliation_runs if r not in requested_runs]
    if never_run:
        problems.append(f"reconciliation runs answered 202 and never taken up: {never_run[:5]}")
    runs_by_status = {
        r["status"]: r["n"]
        for r in await checker.fetch(
            "SELECT status, count(*) AS n FROM reconciler.reconciliation_logs GROUP BY status"
        )
    }
    row = FaultRow(
        fault=fault,
        requests=len(requests),
        answered=len(answered),
        stored=len(payments),
        duplicates=duplicates,
        lost=len(lost) + len(webhooks_lost) + delivered_lost,
        webhooks_answered=int(delivered["delivered"]) + load.webhooks_answered,
        reconcile_runs=runs,
        recovery_seconds=load.recovery_seconds,
        fault_seconds=ctx.fault_seconds,
        details={
            "answers": dict(load.answers),
            "probes": sum(r.probe for r in requests),
            "webhook_resends": load.webhooks_sent,
            "webhook_resends_answered": load.webhooks_answered,
            "provider_webhooks_delivered": int(delivered["delivered"]),
            "reconciliations_requested": load.reconciliations_requested,
            "payments_moved_by_reconciler": int(reconciled or 0),
            "reconciliation_runs": runs_by_status,
            "requested_runs_left_running": sorted(
                i for i, status in requested_runs.items() if status == "running"
            ),
            **ctx.details,
        },
    )
    return row, problems


async def check_invariants(
    fault: str, platform: Platform, checker: Checker, load: Load, ctx: FaultContext
) -> tuple[FaultRow, list[str]]:
    """Let the system settle, then check everything README promises."""
    settled, runs, state = await settle(checker, load)
    # A webhook the provider retries late may be on its way through right now: what is
    # wrong only for a moment (a message in a queue, an event not stored yet) is looked
    # at again; what stays wrong is reported.
    for _ in range(INSPECTIONS):
        row, problems = await inspect(fault, platform, checker, load, ctx, runs)
        if not problems:
            break
        await asyncio.sleep(1.0)
    if not settled:
        problems.append(f"not settled within {SETTLE_SECONDS}s: {state}")
    problems = ctx.notes + problems + await platform.check_ready()
    row.passed = not problems
    log.info("%s: %s %s", fault, row.cells(), row.details)
    return row, problems


# --- one case ---------------------------------------------------------------------------------


async def run_case(
    fault: str,
    inject: Inject,
    *,
    database_url: str,
    rabbitmq_url: str,
    tmp_path: Path,
    services_rabbitmq_url: str | None = None,
    env: dict[str, str] | None = None,
    reconcile_every: float | None = None,
    observed: Callable[[FaultContext], str | None] | None = None,
    load_seconds: float = LOAD_SECONDS,
    rabbitmqctl: Sequence[str] = ("rabbitmqctl",),
) -> FaultRow:
    """Start the platform, load it, inject the fault mid-load, settle, check, record.

    `observed` says what is wrong if the fault never reached the platform (a case that
    passes because nothing happened proves nothing).
    """
    checker = Checker(database_url, rabbitmq_url, rabbitmqctl=rabbitmqctl)
    try:
        with running_services(tmp_path) as services:
            stack = Stack(database_url, services_rabbitmq_url or rabbitmq_url, tmp_path, services)
            platform = Platform(stack, env or {})
            await platform.start_all()
            async with aiohttp.ClientSession() as http:
                load = Load(http, platform.gateway.url, checker, reconcile_every=reconcile_every)
                ctx = FaultContext(platform, load)
                load.start(load_seconds)
                await asyncio.sleep(FAULT_AT_SECONDS)
                ctx.began()
                await inject(ctx)
                if ctx.fault_ended_at is None:
                    ctx.ended()
                await load.finish()
                if observed is not None and (unseen := observed(ctx)):
                    ctx.notes.append(f"the fault was not observed: {unseen}")
                row, problems = await check_invariants(fault, platform, checker, load, ctx)
    finally:
        await checker.close()
    record(row)
    context = f"{fault} (service logs in {tmp_path}):\n" + "\n".join(problems)
    assert row.lost == 0, context
    assert row.duplicates == 0, context
    assert problems == [], context
    return row


async def reconciliation_in_progress(ctx: FaultContext, within: float = 5.0) -> None:
    """Wait (a while) until a reconciliation run is under way, so the fault hits it mid-run."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        running = await ctx.load.checker.fetchval(
            "SELECT count(*) FROM reconciler.reconciliation_logs WHERE status = 'running'",
            within=1.0,
        )
        if running:
            ctx.details["run_in_progress_at_fault"] = True
            return
        await asyncio.sleep(0.01)
    ctx.details["run_in_progress_at_fault"] = False


def clients_saw_503(ctx: FaultContext) -> str | None:
    """The broker outage reached the clients: the gateway refused while it lasted."""
    return None if ctx.load.answers["503"] else "no client was ever answered 503"


def services_saw_database_errors(ctx: FaultContext) -> str | None:
    """A service logged a database call that failed and was retried."""
    logs = "".join(service.logs() for service in ctx.platform.stack.services)
    seen = logs.count('"database transaction failed, retrying"')
    ctx.details["database_retries_logged"] = seen
    return None if seen else "no service logged a failed database transaction"
