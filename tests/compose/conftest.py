"""The compose suite's session: one private dockerd with the stand-ins, a table of cases.

Each case's seconds (its call, without the shared set-up) and result are printed at the
end of the session, with the figures the cases measured (`FIGURES`).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compose import harness

CASES: list[tuple[str, str, float]] = []
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Dockerd]:
    """A private dockerd holding the Debian base and every stand-in image."""
    try:
        harness.check_available()
    except harness.Unavailable as exc:
        pytest.skip(str(exc))
    workdir = tmp_path_factory.mktemp("compose")
    with harness.docker_session(workdir) as daemon:
        FIGURES["debootstrap + docker import, s"] = harness.build_base(daemon, workdir)
        started = time.monotonic()
        names = [n for n in harness.images_named(COMPOSE_FILE) if n in harness.STANDINS]
        # The project's image needs only the Python stand-in: it builds while the others do.
        python, others = PYTHON_IMAGE, [n for n in names if n != PYTHON_IMAGE]
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            rest = pool.submit(harness.build_standins, daemon, others, workdir)
            harness.build_standins(daemon, [python], workdir)
            FIGURES["app image build (on the host's network), s"] = sum(
                harness.build_app_images(daemon, COMPOSE_FILE).values()
            )
            rest.result()
        FIGURES["stand-ins and app image (in parallel), s"] = time.monotonic() - started
        yield daemon


PYTHON_IMAGE = "python:3.11-slim-bookworm"


COMPOSE_FILE = Path(harness.ROOT / "docker-compose.yml")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/compose/" not in report.nodeid:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        CASES.append((report.nodeid.split("::", 1)[1], report.outcome, report.duration))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not CASES:
        return
    write = terminalreporter.write_line
    write("")
    write("| compose case | result | seconds |")
    write("|---|---|---|")
    for name, outcome, seconds in CASES:
        write(f"| {name} | {outcome} | {seconds:.1f} |")
    for name, value in FIGURES.items():
        write(f"{name}: {value:.1f}")
