"""The simulated provider's own Prometheus metrics (HTTP metrics come from libs.common)."""

from __future__ import annotations

from prometheus_client import Counter

CHARGES_CREATED = Counter(
    "provider_charges_total",
    # Not "charges_created_total": the client library would add a "..._created_created" series.
    "Charges created, by outcome (accepted: processing; declined: refused at once).",
    ["outcome"],
)
CHARGES_SETTLED = Counter(
    "provider_charges_settled_total",
    "Charges that reached a final status, by status (succeeded, declined).",
    ["status"],
)
REFUNDS_CREATED = Counter(
    "provider_refunds_total",
    "Refunds accepted (each settles later, succeeded or failed).",
)
REFUNDS_SETTLED = Counter(
    "provider_refunds_settled_total",
    "Refunds that reached a final status, by status (succeeded, failed).",
    ["status"],
)
WEBHOOK_DELIVERIES = Counter(
    "provider_webhook_deliveries_total",
    "Webhook delivery attempts and decisions, by outcome"
    " (delivered, retried, failed, dropped, duplicated).",
    ["outcome"],
)

# Every known label value starts at 0, so rate() sees the first one too.
for _outcome in ("accepted", "declined"):
    CHARGES_CREATED.labels(outcome=_outcome)
for _status in ("succeeded", "declined"):
    CHARGES_SETTLED.labels(status=_status)
for _status in ("succeeded", "failed"):
    REFUNDS_SETTLED.labels(status=_status)
for _outcome in ("delivered", "retried", "failed", "dropped", "duplicated"):
    WEBHOOK_DELIVERIES.labels(outcome=_outcome)
