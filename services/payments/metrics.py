"""The payments service's own metrics (the shared ones are in libs.common.metrics)."""

from prometheus_client import Counter

CHARGE_REQUESTS = Counter(
    "payments_charge_requests_total",
    "Charges asked of the provider, by outcome (processing, succeeded, declined, unavailable,"
    " rejected).",
    ["outcome"],
)
