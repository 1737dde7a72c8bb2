"""Start real service processes (`python -m services.<name>`) the way operators do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"{self.name} exited early:\n{self.logs()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.url}/ready") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} not ready within {within}s:\n{self.logs()}")

    async def wait_exit(self, within: float) -> int:
        deadline = time.monotonic() + within
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running after {within}s")
            await asyncio.sleep(0.05)
        return code

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@contextlib.contextmanager
def running_services(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    """Collects started processes and makes sure none outlives the test."""
    started: list[ServiceProcess] = []
    try:
        yield started
    finally:
        for service in started:
            service.terminate()
        for service in started:
            try:
                service.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                service.kill()


def start_service(
    name: str, env: dict[str, str], tmp_path: Path, *, port: int | None = None
) -> ServiceProcess:
    port = port or free_port()
    log_path = tmp_path / f"{name}-{port}.log"
    full_env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", **env}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            cwd=ROOT,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return ServiceProcess(name, port, process, log_path, full_env)
