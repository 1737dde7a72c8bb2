"""RABBITMQ_URL as a list of cluster nodes: parsed, checked, and refused in production."""

from __future__ import annotations

import pytest

from libs.common.settings import GatewaySettings, SettingsError, load_settings
from tests.unit.test_settings import PLATFORM_VARIABLES, SAFE_PRODUCTION

NODES = (
    "amqp://payments:s3cret@rabbitmq:5672/,"
    " amqp://payments:s3cret@rabbitmq-2:5672/ ,amqp://payments:s3cret@rabbitmq-3:5672/"
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PLATFORM_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_one_url_is_one_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:p@broker:5672/vhost")
    assert GatewaySettings().rabbitmq_node_urls() == ["amqp://u:p@broker:5672/vhost"]


def test_comma_separated_urls_are_the_nodes_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", NODES)
    assert GatewaySettings().rabbitmq_node_urls() == [
        "amqp://payments:s3cret@rabbitmq:5672/",
        "amqp://payments:s3cret@rabbitmq-2:5672/",
        "amqp://payments:s3cret@rabbitmq-3:5672/",
    ]


@pytest.mark.parametrize(
    "value",
    [
        "amqp://u:p@a:5672/,http://u:p@b:5672/",
        "amqp://u:p@a:5672/,amqp:///",
        " , ",
    ],
)
def test_every_node_url_is_checked(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("RABBITMQ_URL", value)
    with pytest.raises(SettingsError) as refused:
        load_settings(GatewaySettings)
    assert "RABBITMQ_URL" in str(refused.value)
    assert "comma-separated" in str(refused.value) or "amqp://" in str(refused.value)


def test_production_refuses_guest_on_any_node(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SAFE_PRODUCTION.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RABBITMQ_URL", NODES)
    assert load_settings(GatewaySettings).rabbitmq_node_urls()[2].endswith("rabbitmq-3:5672/")
    monkeypatch.setenv("RABBITMQ_URL", NODES + ",amqp://guest:guest@rabbitmq-4:5672/")
    with pytest.raises(SettingsError) as refused:
        load_settings(GatewaySettings)
    assert "guest" in str(refused.value)
