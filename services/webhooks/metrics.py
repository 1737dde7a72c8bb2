"""The webhooks service's own metrics (the shared ones are in libs.common.metrics)."""

from prometheus_client import Counter

WEBHOOK_EVENTS = Counter(
    "webhook_events_total",
    "Provider events handled, by outcome: applied, refused, rejected, ignored, orphaned,"
    " duplicate, redelivered, and <outcome>_on_retry for orphans tried again.",
    ["outcome"],
)
