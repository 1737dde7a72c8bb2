"""Monitoring: Prometheus's scrape configuration and alert rules, and Grafana's dashboard.

promtool (from Debian's `prometheus` package, which .ci/run installs) checks both files
and unit-tests the alerts' logic; a real Prometheus then scrapes real service processes
under the shipped configuration (targets moved to 127.0.0.1) and must find every target
up, every rule loaded, and a series for every metric the dashboard or an alert uses, so a
misnamed metric fails here rather than as an empty panel or an alert that never fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from prometheus_client import REGISTRY

from libs.common.signing import SEED_HEADER, seed_signature
from tests.e2e.processes import ROOT, running_services
from tests.e2e.stack import Stack
from tests.support import eventually, free_port

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
ALERTS_YML = PROMETHEUS_DIR / "alerts.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD_JSON = GRAFANA_DIR / "dashboards" / "payments.json"
# Where the compose file mounts deploy/prometheus inside the Prometheus container.
CONTAINER_DIR = "/etc/prometheus/"

# Start order: what the others call first.
SERVICES = ("provider", "payments", "webhooks", "reconciler", "gateway")
REPLICATED = {"payments": 9101, "webhooks": 9102, "reconciler": 9103}
JOBS = {*SERVICES, "prometheus"}
WEBHOOK_SECRET = "monitoring-test-secret"
T = TypeVar("T")

# Words a PromQL expression may hold that are not metric names.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
# Series Prometheus makes itself rather than scrapes.
PROMETHEUS_OWN = {"up"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query) reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals: label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors, with Grafana's $__ variables
    expr = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr
    )  # grouping label lists
    # An identifier followed by "(" is a function or an aggregation, never a metric.
    found = re.findall(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)
    return set(found) - PROMQL_WORDS


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def referenced_metrics() -> set[str]:
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    return set().union(*(metric_names(expr) for expr in exprs))


def defined_metrics() -> set[str]:
    """Every sample name the services' metrics modules can expose."""
    for service in SERVICES:
        importlib.import_module(f"services.{service}.metrics")
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (as .ci/run does)")
    return path


def run_promtool(promtool: str, *args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def as_mounted(tmp_path: Path) -> Path:
    """deploy/prometheus copied to `tmp_path`, the container's mount point rewritten to it."""
    shutil.copy(ALERTS_YML, tmp_path / ALERTS_YML.name)
    config = tmp_path / PROMETHEUS_YML.name
    config.write_text(PROMETHEUS_YML.read_text().replace(CONTAINER_DIR, f"{tmp_path}/"))
    return config


# --- static checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up == 0", {"up"}),
        (
            "histogram_quantile(0.99, sum by (le)"
            ' (rate(http_request_duration_seconds_bucket{route="/pay"}[$__rate_interval])))',
            {"http_request_duration_seconds_bucket"},
        ),
        (
            "time() - max(reconciliation_last_success_timestamp_seconds > 0) > 2 * 3600",
            {"reconciliation_last_success_timestamp_seconds"},
        ),
        (
            'absent(up{job="gateway"}) or sum without (instance) (rate(a_total[5m])) / b',
            {"up", "a_total", "b"},
        ),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_prometheus_config_passes_promtool(promtool: str, tmp_path: Path) -> None:
    # As shipped: its rule file exists only inside the container, so syntax alone here.
    run_promtool(promtool, "check", "config", "--syntax-only", PROMETHEUS_YML)
    # As mounted: the rules it loads are checked too, and linted.
    output = run_promtool(
        promtool, "check", "config", "--lint=all", "--lint-fatal", as_mounted(tmp_path)
    )
    assert "SUCCESS" in output


def test_alert_rules_pass_promtool(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", "--lint=all", "--lint-fatal", ALERTS_YML)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_prometheus_config_scrapes_every_service_and_every_replica() -> None:
    config = load_yaml(PROMETHEUS_YML)
    assert config["rule_files"] == [CONTAINER_DIR + ALERTS_YML.name]
    interval = config["global"]["scrape_interval"]
    assert re.fullmatch(r"\d+s", interval)
    assert 5 <= int(interval[:-1]) <= 15

    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == JOBS
    assert jobs["gateway"]["static_configs"] == [{"targets": ["gateway:3000"]}]
    assert jobs["provider"]["static_configs"] == [{"targets": ["provider:3100"]}]
    for name, port in REPLICATED.items():
        # One A record per replica under `docker compose up --scale`: each is scraped.
        assert jobs[name]["dns_sd_configs"] == [
            {"names": [name], "type": "A", "port": port, "refresh_interval": "15s"}
        ], name
        assert "static_configs" not in jobs[name]


def test_every_alert_says_how_long_how_bad_and_what_to_do() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "TargetDown",
        "ParkingQueueNotEmpty",
        "PaymentPendingTooLong",
        "ReconciliationStale",
        "WebhookSignatureFailures",
        "MessagePublishFailures",
        "HighServerErrorRate",
    }
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, rule["alert"]


def _rule_test(
    series: dict[str, str], eval_time: str, alert: str, expected: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [
            {
                "eval_time": eval_time,
                "alertname": alert,
                "exp_alerts": [{"exp_labels": labels} for labels in expected],
            }
        ],
    }


PARKING = "platform.payment-requested.parking"
RULE_TESTS = [
    # Only the parking queue alerts, even though the main queue holds more.
    _rule_test(
        {
            f'broker_queue_messages{{job="payments", instance="a", queue="{PARKING}"}}': "0 2x10",
            'broker_queue_messages{job="payments", instance="a",'
            ' queue="platform.payment-requested"}': "50x10",
        },
        "5m",
        "ParkingQueueNotEmpty",
        [{"severity": "critical", "queue": PARKING}],
    ),
    # A pending payment older than 15 minutes, seen by one replica of two.
    _rule_test(
        {
            'payments_oldest_unsettled_age_seconds{instance="a", status="pending"}': "600+60x20",
            'payments_oldest_unsettled_age_seconds{instance="b", status="pending"}': "0x20",
            'payments_oldest_unsettled_age_seconds{instance="a", status="processing"}': "5000x20",
        },
        "10m",
        "PaymentPendingTooLong",
        [{"severity": "critical"}],
    ),
    _rule_test(
        {'payments_oldest_unsettled_age_seconds{instance="a", status="pending"}': "600+60x20"},
        "6m",  # 960 s old, but for less than `for`
        "PaymentPendingTooLong",
        [],
    ),
    # A refund pending past 3 hours, seen by one reconciler replica of two.
    _rule_test(
        {
            'refunds_oldest_pending_age_seconds{instance="a"}': "11000+60x30",
            'refunds_oldest_pending_age_seconds{instance="b"}': "0x30",
        },
        "15m",
        "RefundPendingTooLong",
        [{"severity": "warning"}],
    ),
    _rule_test(
        {'refunds_oldest_pending_age_seconds{instance="a"}': "600+60x30"},
        "15m",
        "RefundPendingTooLong",
        [],
    ),
    # Last success at 1 min; another replica that has not measured yet reports 0.
    _rule_test(
        {
            'reconciliation_last_success_timestamp_seconds{instance="a"}': "60x200",
            'reconciliation_last_success_timestamp_seconds{instance="b"}': "0x200",
        },
        "2h",
        "ReconciliationStale",
        [],
    ),
    _rule_test(
        {
            'reconciliation_last_success_timestamp_seconds{instance="a"}': "60x200",
            'reconciliation_last_success_timestamp_seconds{instance="b"}': "0x200",
        },
        "2h15m",
        "ReconciliationStale",
        [{"severity": "warning"}],
    ),
    _rule_test(
        {'reconciliation_last_success_timestamp_seconds{instance="a"}': "0x200"},
        "2h5m",
        "ReconciliationNeverSucceeded",
        [{"severity": "warning"}],
    ),
    _rule_test(
        {'up{job="gateway", instance="gateway:3000"}': "1x200"},
        "2h5m",
        "ReconciliationNeverSucceeded",
        [{"severity": "warning"}],
    ),
    # 30 refused webhooks a minute is a burst; one a minute is noise.
    _rule_test(
        {
            'webhook_signature_failures_total{instance="g", reason="signature_invalid"}': "0+30x20",
            'webhook_signature_failures_total{instance="g", reason="signature_missing"}': "0+1x20",
        },
        "10m",
        "WebhookSignatureFailures",
        [{"severity": "warning"}],
    ),
    _rule_test(
        {'webhook_signature_failures_total{instance="g", reason="signature_missing"}': "0+1x20"},
        "10m",
        "WebhookSignatureFailures",
        [],
    ),
    _rule_test(
        {
            'up{job="gateway", instance="gateway:3000"}': "1 1 0x10",
            'up{job="payments", instance="10.0.0.5:9101"}': "1x12",
        },
        "6m",
        "TargetDown",
        [{"severity": "critical", "job": "gateway", "instance": "gateway:3000"}],
    ),
    _rule_test(
        {
            f'up{{job="{job}", instance="{job}:1"}}': "1x10"
            for job in ("gateway", "provider", "payments", "webhooks")
        },
        "6m",
        "ServiceHasNoTargets",
        [{"severity": "critical", "job": "reconciler"}],
    ),
    # Pre-initialised at 0, then failing: the very first failures count.
    _rule_test(
        {
            'message_publish_failures_total{job="gateway", routing_key="payment.requested",'
            ' reason="timeout"}': "0 0 0 1+1x10",
            'message_publish_failures_total{job="gateway", routing_key="webhook.received",'
            ' reason="timeout"}': "0x13",
        },
        "8m",
        "MessagePublishFailures",
        [
            {
                "severity": "critical",
                "job": "gateway",
                "routing_key": "payment.requested",
                "reason": "timeout",
            }
        ],
    ),
    _rule_test(
        {
            'http_requests_total{job="gateway", route="/pay", status="202"}': "0+100x20",
            'http_requests_total{job="gateway", route="/pay", status="503"}': "0+20x20",
            'http_requests_total{job="gateway", route="/metrics", status="200"}': "0+1000x20",
        },
        "10m",
        "HighServerErrorRate",
        [{"severity": "critical", "job": "gateway", "route": "/pay"}],
    ),
]


RULE_TESTS += [
    # Events waiting longer than 2 minutes, seen by one replica of two.
    _rule_test(
        {
            'payment_events_outbox_oldest_unsent_age_seconds{instance="a"}': "0 0 100+60x20",
            'payment_events_outbox_oldest_unsent_age_seconds{instance="b"}': "0x22",
        },
        "10m",
        "PaymentEventsStuck",
        [{"severity": "warning"}],
    ),
    # A backlog that drains within a minute or two never fires.
    _rule_test(
        {'payment_events_outbox_oldest_unsent_age_seconds{instance="a"}': "0 30 60 90 0x20"},
        "10m",
        "PaymentEventsStuck",
        [],
    ),
]


def test_alerts_fire_when_they_should_and_only_then(promtool: str, tmp_path: Path) -> None:
    # promtool compares annotations too; the rules without them keep expr, for and labels.
    groups = load_yaml(ALERTS_YML)["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "rules.yml").write_text(json.dumps({"groups": groups}))
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": RULE_TESTS}
    (tmp_path / "tests.yml").write_text(json.dumps(tests))
    run_promtool(promtool, "test", "rules", "tests.yml", cwd=tmp_path)


def test_dashboard_panels_query_the_provisioned_prometheus() -> None:
    board = dashboard()
    assert board["uid"] == "payments-platform"
    assert board["schemaVersion"] >= 39
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    datasources = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    [source] = datasources["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
    )
    providers = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml")
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_queries_use_only_metrics_the_services_define() -> None:
    referenced = referenced_metrics()
    # The extraction finds something to check: these are on the dashboard.
    assert {
        "http_request_duration_seconds_bucket",
        "payment_transitions_total",
        "broker_queue_messages",
        "reconciliation_runs_total",
    } <= referenced
    unknown = referenced - PROMETHEUS_OWN - defined_metrics()
    assert not unknown, f"no service defines {sorted(unknown)}"


# --- a real Prometheus scraping real services -------------------------------------------


@contextlib.contextmanager
def running_prometheus(config: Path, port: int, tmp_path: Path) -> Iterator[str]:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: apt-get install prometheus (as .ci/run does)")
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        sys.stderr.write(log_path.read_text(errors="replace"))


def local_config(tmp_path: Path, ports: dict[str, int]) -> Path:
    """The shipped configuration, each job scraping the given 127.0.0.1 port every second."""
    config = load_yaml(PROMETHEUS_YML)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    for rule_file in config["rule_files"]:
        shutil.copy(PROMETHEUS_DIR / Path(rule_file).name, tmp_path / Path(rule_file).name)
    config["rule_files"] = [str(tmp_path / Path(f).name) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


async def drive_traffic(http: aiohttp.ClientSession, gateway: str) -> None:
    """Some of everything: payments, webhooks good and bad, a reconciliation run."""
    for n in range(3):
        async with http.post(
            f"{gateway}/api/payments/pay",
            json={"amount": 100.00, "customer_id": "test_customer", "description": f"n{n}"},
            headers={"Idempotency-Key": f"monitoring-{uuid.uuid4()}"},
        ) as response:
            assert response.status == 202, await response.text()
    body = json.dumps(
        {
            "event_id": f"evt_{uuid.uuid4().hex}",
            "event_type": "payment.completed",
            "payment_id": str(uuid.uuid4()),
            "provider": "simulated",
        }
    ).encode()
    for signature, expected in ((seed_signature(body, WEBHOOK_SECRET), 202), ("0" * 64, 401)):
        async with http.post(
            f"{gateway}/api/webhooks",
            data=body,
            headers={"Content-Type": "application/json", SEED_HEADER: signature},
        ) as response:
            assert response.status == expected, await response.text()
    async with http.post(f"{gateway}/api/reconciliations") as response:
        assert response.status == 202, await response.text()


async def api(http: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with http.get(url, params=params) as response:
        answer = await response.json()
        assert answer["status"] == "success", answer
        return answer["data"]


@pytest.mark.e2e
async def test_prometheus_finds_every_target_rule_and_metric(
    database_url: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    with running_services(tmp_path) as services:
        stack = Stack(database_url, rabbitmq_url, tmp_path, services)
        started = await asyncio.gather(
            *(
                stack.start(
                    name,
                    WEBHOOK_SECRET=WEBHOOK_SECRET,
                    PROVIDER_WEBHOOK_DELAY_MS="100",
                    RECONCILE_CRON="0 0 1 1 *",  # runs only when asked for
                )
                for name in SERVICES
            )
        )
        ports = {service.name: service.port for service in started}
        gateway = next(service for service in started if service.name == "gateway")
        ports["prometheus"] = free_port()
        config = local_config(tmp_path, ports)
        expected_groups = {group["name"] for group in load_yaml(ALERTS_YML)["groups"]}
        referenced = referenced_metrics()

        with running_prometheus(config, ports["prometheus"], tmp_path) as prometheus:
            async with aiohttp.ClientSession() as http:
                await drive_traffic(http, gateway.url)

                async def target_health() -> dict[str, str]:
                    with contextlib.suppress(aiohttp.ClientError):
                        data = await api(http, f"{prometheus}/api/v1/targets", state="active")
                        return {t["labels"]["job"]: t["health"] for t in data["activeTargets"]}
                    return {}

                async def unhealthy_rules() -> list[str]:
                    data = await api(http, f"{prometheus}/api/v1/rules")
                    assert {group["name"] for group in data["groups"]} == expected_groups
                    return [
                        f"{rule['name']}: {rule['health']} {rule.get('lastError', '')}"
                        for group in data["groups"]
                        for rule in group["rules"]
                        if rule["health"] != "ok"
                    ]

                async def missing_metrics() -> list[str]:
                    names = await api(http, f"{prometheus}/api/v1/label/__name__/values")
                    return sorted(referenced - set(names))

                await until(
                    target_health, lambda health: health == dict.fromkeys(JOBS, "up"), "targets"
                )
                up = (await api(http, f"{prometheus}/api/v1/query", query="up"))["result"]
                assert {r["metric"]["job"]: r["value"][1] for r in up} == dict.fromkeys(JOBS, "1")
                await until(unhealthy_rules, lambda unhealthy: not unhealthy, "unhealthy rules")
                await until(missing_metrics, lambda missing: not missing, "no series for")


async def until(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, within: float = 30
) -> None:
    """Wait until `done(await read())`; fail with the last reading, named `what`."""
    last: list[T] = []

    async def check() -> bool:
        last[:] = [await read()]
        return done(last[0])

    try:
        await eventually(check, within=within, interval=0.5)
    except AssertionError:
        pytest.fail(f"{what}: {last[0] if last else None!r} after {within} s")
