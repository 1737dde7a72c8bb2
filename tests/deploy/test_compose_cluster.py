"""docker-compose.cluster.yml, checked statically: three clustered nodes, services on all.

The file is an override of docker-compose.yml (`docker compose -f docker-compose.yml -f
docker-compose.cluster.yml up`). It is validated against the Compose specification on
its own, then merged over the base file the way compose merges (mappings key by key,
volumes by their target) to check what the cluster is made of. tests/cluster runs the
same cluster settings (deploy/rabbitmq/cluster.conf) on local processes under faults.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft201909Validator

from libs.common.settings import BrokerSettings
from tests.deploy.test_compose import compose_schema

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
CLUSTER_TEXT = (ROOT / "docker-compose.cluster.yml").read_text()
CLUSTER = yaml.safe_load(CLUSTER_TEXT)
CLUSTER_CONF = (ROOT / "deploy" / "rabbitmq" / "cluster.conf").read_text()
NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")
BROKER_CLIENTS = ("gateway", "payments", "webhooks", "reconciler")
CONF_TARGET = "/etc/rabbitmq/conf.d/20-cluster.conf"

__all__ = ["compose_schema"]  # the fixture, shared with test_compose


def _target(volume: str) -> str:
    return volume.split(":")[1]


def _merge(base: Any, override: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            merged[k] = _merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return merged
    if key == "volumes" and isinstance(base, list) and isinstance(override, list):
        by_target = {_target(v): v for v in base}
        by_target.update({_target(v): v for v in override})
        return list(by_target.values())
    return copy.deepcopy(override)


MERGED: dict[str, Any] = _merge(BASE, CLUSTER)
SERVICES: dict[str, Any] = MERGED["services"]


def _environment(name: str) -> dict[str, str]:
    env: dict[str, str] = SERVICES[name]["environment"]
    return env


def _defaults(value: str) -> str:
    """`${VAR:-default}` as compose renders it with no .env."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_cluster_file_follows_the_compose_specification(compose_schema: dict[str, Any]) -> None:
    for document in (CLUSTER, MERGED):
        errors = sorted(Draft201909Validator(compose_schema).iter_errors(document), key=str)
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_three_nodes_with_fixed_hostnames_and_data_of_their_own() -> None:
    data = set()
    for name in NODES:
        node = SERVICES[name]
        assert node["hostname"] == name
        assert node["image"].startswith("rabbitmq:3.")
        assert "container_name" not in node
        [volume] = [v for v in node["volumes"] if _target(v) == "/var/lib/rabbitmq"]
        data.add(volume.split(":")[0])
        assert node["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert len(data) == len(NODES)
    assert data <= set(MERGED["volumes"])


def test_nodes_share_one_cookie_for_the_server_and_its_cli() -> None:
    cookies = set()
    for name in NODES:
        env = _environment(name)
        server = env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]
        cli = env["RABBITMQ_CTL_ERL_ARGS"]
        assert server == cli
        [cookie] = re.findall(r"-setcookie (\S+)", server)
        cookies.add(cookie)
    assert len(cookies) == 1
    assert "RABBITMQ_ERLANG_COOKIE" in next(iter(cookies))


def test_peer_discovery_lists_the_three_nodes_and_each_node_reads_it() -> None:
    settings = {
        k.strip(): v.strip()
        for k, v in (
            line.split("=", 1)
            for line in CLUSTER_CONF.splitlines()
            if line.strip() and not line.startswith("#")
        )
    }
    assert settings["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = sorted(
        v for k, v in settings.items() if k.startswith("cluster_formation.classic_config.nodes.")
    )
    assert listed == sorted(f"rabbit@{SERVICES[n]['hostname']}" for n in NODES)
    assert settings["cluster_partition_handling"] == "pause_minority"
    for name in NODES:
        mounts = [v for v in SERVICES[name]["volumes"] if _target(v) == CONF_TARGET]
        assert mounts == [f"./deploy/rabbitmq/cluster.conf:{CONF_TARGET}:ro"]


def test_the_nodes_start_together() -> None:
    """A blank node looks for its peers before it listens at all (peer discovery retries
    for minutes): a node that waited for another to be healthy would hold up the first
    boot. Started together, peer discovery's lock lets one node form the cluster."""
    for name in NODES:
        assert not set(SERVICES[name].get("depends_on") or {}) & set(NODES), name


@pytest.mark.parametrize("name", BROKER_CLIENTS)
def test_services_are_given_every_node(name: str) -> None:
    env = _environment(name)
    settings = BrokerSettings.model_validate({"rabbitmq_url": _defaults(env["RABBITMQ_URL"])})
    hosts = [urlsplit(url).hostname for url in settings.rabbitmq_node_urls()]
    assert hosts == [SERVICES[n]["hostname"] for n in NODES]
    for node in NODES:
        assert SERVICES[name]["depends_on"][node]["condition"] == "service_healthy"
