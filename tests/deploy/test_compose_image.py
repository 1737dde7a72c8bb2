"""What the compose suite (tests/compose) found, held statically too, so a change that
undoes it fails even where no Docker daemon can run."""

from __future__ import annotations

import re

import pytest

from tests.deploy.test_compose import DEFAULT_PORTS, DOCKERFILE, ROOT, SERVICES


def test_rabbitmq_keeps_its_node_name_across_recreated_containers() -> None:
    """RabbitMQ names its node, and its data directory, after the hostname: without a
    fixed one a recreated container starts an empty node beside the old one's data."""
    assert SERVICES["rabbitmq"].get("hostname"), "rabbitmq needs a fixed hostname"


@pytest.mark.parametrize("name", list(DEFAULT_PORTS))
def test_each_service_exposes_the_port_it_serves(name: str) -> None:
    assert SERVICES[name].get("expose") == [str(DEFAULT_PORTS[name])]


def test_the_shared_image_exposes_no_port_of_its_own() -> None:
    """One image runs five services on five ports: an EXPOSE would be wrong for four."""
    assert not re.search(r"^EXPOSE ", DOCKERFILE, re.M)


def test_the_image_holds_paymentsctl_and_its_code() -> None:
    copied = set(re.findall(r"^COPY (\S+) \./\1$", DOCKERFILE, re.M))
    packages = {
        p.split("*")[0] for p in re.findall(r'"(\w+)\*"', (ROOT / "pyproject.toml").read_text())
    }
    assert packages <= copied, f"pyproject's packages not in the image: {packages - copied}"
