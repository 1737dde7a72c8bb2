"""The gateway's own metrics (the shared ones are in libs.common.metrics)."""

from prometheus_client import Counter

SIGNATURE_FAILURES = Counter(
    "webhook_signature_failures_total",
    "Webhooks refused for their signature, by reason (the API's error code).",
    ["reason"],
)
WEBHOOKS_RECEIVED = Counter(
    "webhooks_received_total",
    "Webhooks verified and handed to the broker, by signature scheme.",
    ["scheme"],
)
