"""The benchmark harness runs: `python -m bench --quick --only intake` writes its results.

Only that it runs, what it writes and that it cleans up are checked, never the figures:
benchmarks are not timed tests (see bench/README.md).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.support import PG_ADMIN_DSN

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]
FIGURE_KEYS = {"name", "value", "unit", "baseline_name", "baseline", "ratio", "target", "meets"}


async def _databases(prefix: str) -> list[str]:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", prefix + "%"
        )
    finally:
        await conn.close()
    return [row["datname"] for row in rows]


def leftovers(run_id: str) -> list[str]:
    """Databases and vhosts of that bench run that still exist."""
    prefix = f"bench_{run_id}_"
    vhosts = subprocess.run(
        ["rabbitmqctl", "--quiet", "list_vhosts"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return asyncio.run(_databases(prefix)) + [v for v in vhosts if v.startswith(prefix)]


def test_quick_intake_writes_json_and_chart(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "intake", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    [result_file] = tmp_path.glob("*.json")
    assert result_file.with_suffix(".png").stat().st_size > 0
    document = json.loads(result_file.read_text())
    assert document["quick"] is True
    assert document["scenarios_run"] == ["intake"]
    assert document.keys() >= {"started_at", "run_id", "duration_s", "commit", "machine"}

    intake = document["scenarios"]["intake"]
    assert intake["error"] is None
    figures = {figure["name"]: figure for figure in intake["figures"]}
    assert any(name.startswith("/pay req/s") for name in figures)
    assert any(name.startswith("/pay p99 at half max") for name in figures)
    for figure in figures.values():
        assert figure.keys() >= FIGURE_KEYS
        assert figure["value"] is not None
        assert figure["baseline"]
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["baseline"], rel=0.01)
    assert intake["details"]["non_202_answers"] == 0
    # The table is printed, and nothing the run made is left behind.
    assert "/pay req/s" in run.stdout
    assert leftovers(document["run_id"]) == []
