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

import asyncpg

from tools.launch import ROOT, SERVICES, LaunchError, ServiceProcess, start, stop_blocking, wiring

LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/payment_api"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port-offset", type=int, default=0, help="add this to every port")
    args = parser.parse_args()

    ports = {name: port + args.port_offset for name, port in SERVICES.items()}
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", LOCAL_DATABASE_URL)
    env.update(
        wiring(provider_url=f"http://127.0.0.1:{ports['provider']}", gateway_port=ports["gateway"])
    )

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

    services: list[ServiceProcess] = []
    try:
        for name, port in ports.items():
            services.append(start(name, {}, port=port, base_env=env, host=None))
            try:
                services[-1].wait_ready_blocking()
            except LaunchError as exc:
                say(str(exc).splitlines()[0])
                return 1
        say("every service is ready:")
        for service in services:
            say(f"  {service.name:<10} {service.url}")
        say("Ctrl-C stops them all.")
        while not stopping:
            for service in services:
                if service.process.poll() is not None:
                    code = service.process.returncode
                    say(f"{service.name} exited with status {code}; stopping the rest")
                    return 1
            time.sleep(0.2)
        say("stopping")
        return 0
    finally:
        for name in stop_blocking(services):
            say(f"{name} did not stop in time; it was killed")
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
