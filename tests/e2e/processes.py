"""Start real service processes (`python -m services.<name>`) the way operators do.

A thin layer over tools.launch (the launcher `make run` and the bench use too), with
each process's output in the test's temporary directory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tools.launch import ROOT, ServiceProcess, start, stop_blocking

__all__ = ["ROOT", "ServiceProcess", "running_services", "start_service"]

# SIGTERM, then this long for every process to exit, then SIGKILL.
STOP_TIMEOUT_SECONDS = 15.0


@contextlib.contextmanager
def running_services(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    """Collects started processes and makes sure none outlives the test."""
    started: list[ServiceProcess] = []
    try:
        yield started
    finally:
        stop_blocking(started, STOP_TIMEOUT_SECONDS)


def start_service(
    name: str, env: dict[str, str], tmp_path: Path, *, port: int | None = None
) -> ServiceProcess:
    return start(name, env, port=port, log_dir=tmp_path)
