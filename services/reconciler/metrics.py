"""The reconciler's metrics."""

from prometheus_client import Counter, Gauge, Histogram

RUNS = Counter(
    "reconciliation_runs_total",
    "Reconciliation runs, by trigger (cron, manual) and outcome (completed, partial, failed,"
    " skipped).",
    ["trigger", "outcome"],
)
RUN_DURATION = Histogram(
    "reconciliation_run_duration_seconds",
    "How long a reconciliation run took.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
PAYMENTS_SETTLED = Counter(
    "reconciliation_payments_settled_total",
    "Payments whose status a reconciliation run changed, by the status they moved to.",
    ["to_status"],
)
REFUNDS_SETTLED = Counter(
    "reconciliation_refunds_settled_total",
    "Refunds a reconciliation run settled (their webhook never came), by outcome.",
    ["status"],
)
LAST_SUCCESSFUL_RUN = Gauge(
    "reconciliation_last_success_timestamp_seconds",
    "When the last reconciliation run (by any replica) finished without errors (Unix time).",
)
OLDEST_UNSETTLED_AGE = Gauge(
    "payments_oldest_unsettled_age_seconds",
    "Age of the oldest payment still pending or processing, by status.",
    ["status"],
)
OLDEST_PENDING_REFUND_AGE = Gauge(
    "refunds_oldest_pending_age_seconds",
    "Age of the oldest refund still pending (0 when none is).",
)

# Every known label value starts at 0, so rate() and the alerts see the first run too.
for _trigger in ("cron", "manual"):
    for _outcome in ("completed", "partial", "failed", "skipped"):
        RUNS.labels(trigger=_trigger, outcome=_outcome)
for _status in ("processing", "completed", "failed"):
    PAYMENTS_SETTLED.labels(to_status=_status)
for _status in ("succeeded", "failed"):
    REFUNDS_SETTLED.labels(status=_status)
