"""The webhooks service's own metrics (the shared ones are in libs.common.metrics)."""

from prometheus_client import Counter

WEBHOOK_EVENTS = Counter(
    "webhook_events_total",
    "Provider events handled, by outcome: applied, refused, rejected, ignored, orphaned,"
    " duplicate, redelivered, and <outcome>_on_retry for orphans tried again.",
    ["outcome"],
)

# Every known outcome starts at 0, so rate() sees the first one too.
for _outcome in (
    "applied",
    "refused",
    "rejected",
    "ignored",
    "orphaned",
    "duplicate",
    "redelivered",
):
    WEBHOOK_EVENTS.labels(outcome=_outcome)
