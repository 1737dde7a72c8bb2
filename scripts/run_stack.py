"""`make run`: the whole platform as local processes, against local PostgreSQL and RabbitMQ.

Creates the database if it is missing, migrates it, starts every service with
`python -m services.<name>`, waits until each answers /ready, prints where each listens,
and on Ctrl-C (or SIGTERM) stops them all with SIGTERM, as an orchestrator would. If a
service dies on its own, the others are stopped too and the exit status says so.

Configuration comes from the environment, as for the services themselves; without
DATABASE_URL the local default below is used. `--port-offset N` moves every port by N
(so a second stack, or a test, can run beside the first).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/payment_api"
# Start order: what others call first. Ports: each service's default PORT (README's
# configuration table).
SERVICES = {
    "provider": 3100,
    "payments": 9101,
    "webhooks": 9102,
    "reconciler": 9103,
    "gateway": 3000,
}
READY_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 20


def say(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)  # noqa: T201 - a CLI talking to its user


async def ensure_database(url: str) -> None:
    name = url.rsplit("/", 1)[1].split("?", 1)[0]
    admin_url = url.rsplit("/", 1)[0] + "/postgres"
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
            say(f"created database {name}")
    finally:
        await conn.close()


def wait_ready(name: str, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"[run] {name} exited with status {process.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"[run] {name} not ready after {READY_TIMEOUT_SECONDS} s")


def stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop in time; killing it")
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port-offset", type=int, default=0, help="add this to every port")
    args = parser.parse_args()

    ports = {name: port + args.port_offset for name, port in SERVICES.items()}
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", LOCAL_DATABASE_URL)
    env["PROVIDER_URL"] = f"http://127.0.0.1:{ports['provider']}"
    env["PROVIDER_WEBHOOK_URL"] = f"http://127.0.0.1:{ports['gateway']}/api/webhooks"

    asyncio.run(ensure_database(env["DATABASE_URL"]))
    say("migrating")
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True
    )

    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, port in ports.items():
            processes[name] = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", f"services.{name}"],
                cwd=ROOT,
                env={**env, "PORT": str(port)},
                # Ctrl-C reaches only this launcher, which then stops the services in order.
                start_new_session=True,
            )
            wait_ready(name, port, processes[name])
        say("every service is ready:")
        for name, port in ports.items():
            say(f"  {name:<10} http://127.0.0.1:{port}")
        say("Ctrl-C stops them all.")
        while not stopping:
            for name, process in processes.items():
                if process.poll() is not None:
                    say(f"{name} exited with status {process.returncode}; stopping the rest")
                    return 1
            time.sleep(0.2)
        say("stopping")
        return 0
    finally:
        stop(processes)
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
