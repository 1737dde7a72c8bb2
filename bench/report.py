"""Figures, the printed table, the JSON file and the chart.

Every figure carries the baseline it was measured against in the same run and their
ratio, oriented so that a ratio above 1 means better than the baseline unless
`better` says "lower" (latencies, durations). A target, when the benchmarks issue sets
one, is checked against the ratio or against the value, as `target_on` says.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    baseline_name: str
    baseline: float | None
    better: Literal["higher", "lower"] = "higher"
    target: str | None = None  # e.g. ">= 0.8" or "< 25"
    target_on: Literal["ratio", "value"] = "ratio"
    note: str = ""
    ratio: float | None = field(init=False)
    meets: bool | None = field(init=False)

    def __post_init__(self) -> None:
        if self.value is None or not self.baseline:
            self.ratio = None
        else:
            self.ratio = round(self.value / self.baseline, 3)
        self.meets = self._check()

    def _check(self) -> bool | None:
        if self.target is None:
            return None
        subject = self.ratio if self.target_on == "ratio" else self.value
        if subject is None:
            return False
        op, _, number = self.target.partition(" ")
        bound = float(number)
        return {
            ">=": subject >= bound,
            ">": subject > bound,
            "<=": subject <= bound,
            "<": subject < bound,
        }[op]


@dataclass
class ScenarioResult:
    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    error: str | None = None

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = (
        f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}" if value < 10 else f"{value:.1f}"
    )
    return f"{text} {unit}".strip()


def table(results: list[ScenarioResult]) -> str:
    rows = [("scenario", "figure", "value", "baseline", "ratio", "target", "ok")]
    for result in results:
        if result.error:
            rows.append((result.name, "FAILED: " + result.error[:70], "", "", "", "", ""))
        for f in result.figures:
            target = "-"
            if f.target:
                target = f"{'ratio' if f.target_on == 'ratio' else 'value'} {f.target}"
            ok = "-" if f.meets is None else ("yes" if f.meets else "NO")
            rows.append(
                (
                    result.name,
                    f.name,
                    _num(f.value, f.unit),
                    f"{f.baseline_name}: {_num(f.baseline, f.unit)}",
                    "-" if f.ratio is None else f"{f.ratio:.3f}",
                    target,
                    ok,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def to_json(results: list[ScenarioResult], run: dict[str, Any]) -> dict[str, Any]:
    return {**run, "scenarios": {r.name: asdict(r) for r in results}}


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def write_chart(path: Path, results: list[ScenarioResult], title: str) -> None:
    """One bar per figure: its ratio to its baseline, with the target where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    ratios: list[float] = []
    colours: list[str] = []
    targets: list[float | None] = []
    for result in results:
        for f in result.figures:
            if f.ratio is None:
                continue
            labels.append(f"{result.name}: {f.name}")
            ratios.append(f.ratio)
            colours.append("tab:gray" if f.meets is None else "tab:green" if f.meets else "tab:red")
            bound = f.target.partition(" ")[2] if f.target and f.target_on == "ratio" else None
            targets.append(float(bound) if bound else None)
    height = max(3.0, 0.32 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(11, height))
    positions = list(range(len(labels)))[::-1]
    ax.barh(positions, ratios, color=colours)
    for y, target in zip(positions, targets, strict=True):
        if target is not None:
            ax.plot([target, target], [y - 0.4, y + 0.4], color="black", linewidth=2)
    for y, ratio in zip(positions, ratios, strict=True):
        ax.text(ratio, y, f" {ratio:.3g}", va="center", fontsize=7)
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("ratio to the baseline of the same run (log; black tick: target)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
