"""README's table of what to do when an alert fires names exactly the alerts that exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def shipped_alerts() -> set[str]:
    groups = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}


def documented_alerts() -> set[str]:
    section = (ROOT / "README.md").read_text().split("What to do when an alert fires", 1)[1]
    table = section.split("\n\n", 2)[1]
    names: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Za-z]+)`", line.split("|")[1]))
    return names


def test_every_alert_has_its_row_in_readme_and_every_row_an_alert() -> None:
    assert "PaymentEventsStuck" in shipped_alerts()
    assert documented_alerts() == shipped_alerts()
