"""Start the platform's services as local processes, the way an orchestrator does.

The one launcher that `make run` (scripts/run_stack.py), the end-to-end and fault tests
and the bench share: the port table, a free port, the variables that wire the services
to each other, `python -m services.<name>`, the wait for /ready, and the stop (SIGTERM,
a bounded wait, then SIGKILL). Development tooling, not part of a service: it lives in
`tools/` because tests, bench and scripts all import it and mypy checks it with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every service and its default PORT (README's configuration table), in start order:
# what the others call first comes first.
SERVICES: dict[str, int] = {
    "provider": 3100,
    "payments": 9101,
    "webhooks": 9102,
    "reconciler": 9103,
    "gateway": 3000,
}
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0

_handed_out: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1, never one this process handed out before (a port chosen
    for a service that has not bound it yet is still free to the kernel)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wiring(*, provider_url: str, gateway_port: int) -> dict[str, str]:
    """The variables that point the services at each other on 127.0.0.1."""
    return {
        "PROVIDER_URL": provider_url,
        "PROVIDER_WEBHOOK_URL": f"http://127.0.0.1:{gateway_port}/api/webhooks",
    }


def answers_ready(port: int) -> bool:
    """Whether the process on `port` answers /ready with 200 (within two seconds)."""
    url = f"http://127.0.0.1:{port}/ready"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclasses.dataclass
class ServiceProcess:
    """A process the launcher started: a service (or another server of ours)."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path | None
    env: dict[str, str] = dataclasses.field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def wait_ready_blocking(self, within: float = READY_TIMEOUT_SECONDS) -> None:
        """Return once /ready answers 200; raise if the process exits or `within` passes."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(
                    f"{self.name} exited with status {self.process.returncode} while starting"
                    f":\n{self.tail()}"
                )
            if answers_ready(self.port):
                return
            time.sleep(0.1)
        raise LaunchError(f"{self.name} not ready within {within} s:\n{self.tail()}")

    async def wait_ready(self, within: float = READY_TIMEOUT_SECONDS) -> None:
        await asyncio.to_thread(self.wait_ready_blocking, within)

    async def wait_exit(self, within: float) -> int:
        """The exit status, once the process has exited; raise after `within` seconds."""
        try:
            return await asyncio.to_thread(self.process.wait, within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {within}s") from None

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


class LaunchError(AssertionError):
    """A service exited while starting, or did not become ready in time.

    An AssertionError, so that a test waiting for a service fails as an assertion."""


def start(
    name: str,
    env: Mapping[str, str],
    *,
    port: int | None = None,
    log_dir: Path | None = None,
    argv: Sequence[str] | None = None,
    base_env: Mapping[str, str] | None = None,
    host: str | None = "127.0.0.1",
) -> ServiceProcess:
    """`python -m services.<name>` (or `argv` after the interpreter) on 127.0.0.1:`port`.

    The environment is `base_env` (this process's by default), PORT and HOST (unless
    `host` is None: then the environment's or the service's default), then `env`.
    Its output goes to a file in `log_dir`, or to this process's own output without one.
    It runs in a session of its own, so a Ctrl-C reaches only the launcher, which then
    stops it in order.
    """
    port = port or free_port()
    full_env = {
        **(os.environ if base_env is None else base_env),
        "PORT": str(port),
        **({"HOST": host} if host else {}),
        **env,
    }
    command = [sys.executable, *(argv or ["-m", f"services.{name}"])]
    log_path = log_dir / f"{name}-{port}.log" if log_dir else None
    with contextlib.ExitStack() as files:
        output = files.enter_context(log_path.open("wb")) if log_path else None
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
            command,
            cwd=ROOT,
            env=full_env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )
    return ServiceProcess(name, port, process, log_path, full_env)


def stop_blocking(
    services: Iterable[ServiceProcess], timeout: float = STOP_TIMEOUT_SECONDS
) -> list[str]:
    """SIGTERM to every one, wait for all up to `timeout` seconds together, then SIGKILL
    what is left. Returns the names of those that had to be killed."""
    services = list(services)
    for service in services:
        service.terminate()
    deadline = time.monotonic() + timeout
    killed = []
    for service in services:
        try:
            service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed.append(service.name)
            service.kill()
    return killed


async def stop(
    services: Iterable[ServiceProcess], within: float = STOP_TIMEOUT_SECONDS
) -> list[str]:
    """`stop_blocking` for async callers."""
    return await asyncio.to_thread(stop_blocking, list(services), within)
