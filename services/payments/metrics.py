"""The payments service's own metrics (the shared ones are in libs.common.metrics)."""

from prometheus_client import Counter

CHARGE_REQUESTS = Counter(
    "payments_charge_requests_total",
    "Charges asked of the provider, by outcome (processing, succeeded, declined, unavailable,"
    " rejected).",
    ["outcome"],
)

# Every known outcome starts at 0, so rate() sees the first one too.
for _outcome in ("processing", "succeeded", "declined", "unavailable", "rejected"):
    CHARGE_REQUESTS.labels(outcome=_outcome)
