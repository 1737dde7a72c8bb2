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

REFUND_REQUESTS = Counter(
    "payments_refund_requests_total",
    "Refunds asked of the provider, by outcome (processing, succeeded, failed: the"
    " provider's answer; unavailable; rejected; settled_before: nothing left to ask).",
    ["outcome"],
)
for _outcome in ("processing", "succeeded", "failed", "unavailable", "rejected", "settled_before"):
    REFUND_REQUESTS.labels(outcome=_outcome)
