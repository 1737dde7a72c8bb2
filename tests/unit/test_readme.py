"""README's configuration table and the settings classes name the same variables."""

from __future__ import annotations

import re
from pathlib import Path

from libs.common import settings

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_variables() -> set[str]:
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    return names


def read_variables() -> set[str]:
    classes = [
        settings.GatewaySettings,
        settings.PaymentsSettings,
        settings.WebhooksSettings,
        settings.ReconcilerSettings,
        settings.ProviderSettings,
        settings.CtlSettings,
    ]
    return {name.upper() for cls in classes for name in cls.model_fields}


def test_every_variable_is_documented_and_every_documented_one_is_read() -> None:
    assert documented_variables() == read_variables()
