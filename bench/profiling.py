"""py-spy on a service process while a scenario measures it (`python -m bench --profile`).

py-spy is not a project dependency: install it into the virtualenv to profile
(`.venv/bin/pip install py-spy`). Profiles are raw collapsed stacks, one file per
process, summarised here into where the samples fall: the project's own frames
(inclusive) and the packages whose code was on top of the stack (self time).
Profiling slows the process down, so a profiled run's figures are not the ones to quote.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_PREFIXES = ("services/", "libs/", "bench/")


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Profiler:
    popen: subprocess.Popen[bytes]
    output: Path

    @classmethod
    def start(cls, pid: int, output: Path) -> Profiler:
        tool = py_spy()
        if tool is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        output.parent.mkdir(parents=True, exist_ok=True)
        popen = subprocess.Popen(  # noqa: S603 - py-spy on a process we started
            [
                tool,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "100",
                "-o",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return cls(popen, output)

    def stop(self) -> dict[str, Any] | None:
        """Stop sampling (py-spy writes its file on SIGINT) and summarise the profile."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        if not self.output.exists():
            return None
        return summarise(self.output)


def _frame_file(frame: str) -> str:
    # A raw frame reads "function (path/to/file.py:123)".
    start = frame.rfind(" (")
    return frame[start + 2 : frame.rfind(":")] if start >= 0 else frame


def _package(path: str) -> str:
    first = path.split("/", 1)[0]
    return first.removesuffix(".py")


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    total = 0
    self_by_package: collections.Counter[str] = collections.Counter()
    self_by_frame: collections.Counter[str] = collections.Counter()
    project_inclusive: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        self_by_frame[leaf] += count
        self_by_package[_package(_frame_file(leaf))] += count
        for frame in set(frames):
            if _frame_file(frame).startswith(PROJECT_PREFIXES):
                project_inclusive[frame] += count

    def share(counter: collections.Counter[str]) -> list[list[Any]]:
        return (
            [[name, round(n / total, 4)] for name, n in counter.most_common(top)] if total else []
        )

    return {
        "samples": total,
        "self_by_package": share(self_by_package),
        "self_by_frame": share(self_by_frame),
        "project_inclusive": share(project_inclusive),
    }
