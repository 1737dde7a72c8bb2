"""The fault suite's shared fixtures: a vhost per case, and one table of every case.

They live here so that every fault module (this folder's test_*.py) shares one table,
written once per session, without importing fixtures from another test module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import RESULTS, markdown_table
from tests.support import fresh_vhost


class FaultTable:
    """Prints every case's row once the session ends, and keeps them in results.md."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not RESULTS:
            return
        terminalreporter.write_sep("=", "fault injection")
        for line in markdown_table(RESULTS).splitlines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(also in {self.path})")


@pytest.fixture(scope="session", autouse=True)
def fault_table(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    path = tmp_path_factory.mktemp("faults", numbered=False) / "results.md"
    if not pytestconfig.pluginmanager.has_plugin("fault-table"):
        pytestconfig.pluginmanager.register(FaultTable(path), "fault-table")
    yield
    path.write_text(markdown_table(RESULTS))


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A vhost per case: nothing an earlier case left in a queue reaches this one."""
    with fresh_vhost() as url:
        yield url
