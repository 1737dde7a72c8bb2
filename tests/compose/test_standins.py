"""Every image the compose file and the Dockerfile name has a stand-in, but Grafana's."""

from __future__ import annotations

from tests.compose import harness
from tests.compose.conftest import COMPOSE_FILE


def test_every_image_named_has_a_stand_in_except_grafana() -> None:
    named = harness.images_named(COMPOSE_FILE)
    without = {name for name in named if name not in harness.STANDINS}
    assert all(name.startswith("grafana/") for name in without), without
    assert set(harness.STANDINS) <= set(named), "a stand-in for an image nothing uses"
    readme = (harness.STANDINS_DIR / "README.md").read_text()
    for name, folder in harness.STANDINS.items():
        assert (harness.STANDINS_DIR / folder / "Dockerfile").exists()
        assert f"`{name}`" in readme
