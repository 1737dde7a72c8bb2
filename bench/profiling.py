"""py-spy on a service process while a scenario measures it (`python -m bench --profile`).

py-spy is not a project dependency: install it into the virtualenv to profile
(`.venv/bin/pip install py-spy`). Profiles are raw collapsed stacks, one file per
process, summarised here into where the samples fall: the project's own frames
(inclusive) and the packages whose code was on top of the stack (self time).
Profiling slows the process down, so a profiled run's figures are not the ones to quote.

`python -m bench.profiling FILE [--under FRAME]` reads one raw profile: the frames with
the most samples (inclusive and self), or what the frames matching FRAME spend their
samples on, line by line (e.g. `--under "accept_payment (services/gateway/intake.py"`).
"""

from __future__ import annotations

import argparse
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


def _stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            stacks.append((stack.split(";"), int(count_text)))
    return stacks


def breakdown(path: Path, under: str) -> tuple[int, int, collections.Counter[str]]:
    """(all samples, samples under the first frame matching `under`, its callees' samples)."""
    total = matched = 0
    callees: collections.Counter[str] = collections.Counter()
    for frames, count in _stacks(path):
        total += count
        for i, frame in enumerate(frames):
            if under in frame:
                matched += count
                callees[frames[i + 1] if i + 1 < len(frames) else "<self>"] += count
                break
    return total, matched, callees


def main() -> None:
    parser = argparse.ArgumentParser(description="Read a raw py-spy profile.")
    parser.add_argument("file", type=Path)
    parser.add_argument("--under", help="break down the samples of the frames matching this")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.under:
        total, matched, callees = breakdown(args.file, args.under)
        print(f"{args.under}: {matched / max(total, 1):.1%} of {total} samples")
        for frame, n in callees.most_common(args.top):
            print(f"  {n / total:6.1%}  {frame}")
        return
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, count in _stacks(args.file):
        total += count
        leaf[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    print(f"{total} samples")
    for title, counter in (("inclusive", inclusive), ("self", leaf)):
        print(f"--- {title}")
        for frame, n in counter.most_common(args.top):
            print(f"{n / max(total, 1):6.1%}  {frame}")


if __name__ == "__main__":
    main()
