"""Prometheus metrics shared by every service, named by Prometheus conventions.

They live in the process-wide default registry: one process is one service, and each
service's /metrics shows what that process did. Counters only go up, so tests read
deltas rather than absolute values.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets from 1 ms to 10 s: the API answers in milliseconds, timeouts are seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request, by route template and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)

MESSAGES_PUBLISHED = Counter(
    "messages_published_total",
    "Messages the broker confirmed, by routing key.",
    ["routing_key"],
)
PUBLISH_FAILURES = Counter(
    "message_publish_failures_total",
    "Publishes that were not confirmed, by routing key and reason.",
    ["routing_key", "reason"],
)
PUBLISH_DURATION = Histogram(
    "message_publish_duration_seconds",
    "Time from publish to the broker's confirm (or to the failure), by routing key.",
    ["routing_key"],
    buckets=LATENCY_BUCKETS,
)
MESSAGES_CONSUMED = Counter(
    "messages_consumed_total",
    "Messages taken from a queue, by queue and outcome (processed, retried, parked).",
    ["queue", "outcome"],
)
MESSAGE_PROCESSING_DURATION = Histogram(
    "message_processing_duration_seconds",
    "Time from delivery to ack of a message, by queue.",
    ["queue"],
    buckets=LATENCY_BUCKETS,
)

PAYMENT_TRANSITIONS = Counter(
    "payment_transitions_total",
    "Payment status changes asked for, by source, target status and outcome (applied, refused).",
    ["source", "to_status", "outcome"],
)

REFUNDS_SETTLED = Counter(
    "refunds_settled_total",
    "Refunds that reached their outcome, by source (webhook, reconciler, provider) and"
    " status (succeeded, failed).",
    ["source", "status"],
)
# Every known pair starts at 0, so rate() and Prometheus see the series before the first.
for _source in ("webhook", "reconciler", "provider"):
    for _status in ("succeeded", "failed"):
        REFUNDS_SETTLED.labels(source=_source, status=_status)

QUEUE_MESSAGES = Gauge(
    "broker_queue_messages",
    "Messages waiting in a queue (ready, not yet delivered), as last seen by its consumer.",
    ["queue"],
)
QUEUE_CONSUMERS = Gauge(
    "broker_queue_consumers",
    "Consumers attached to a queue, as last seen by one of them.",
    ["queue"],
)

# Events out (libs/common/outbox.py).
EVENTS_WRITTEN = Counter(
    "payment_events_written_total",
    "Payment events written to the outbox with their transition, by type.",
    ["type"],
)
EVENTS_PUBLISHED = Counter(
    "payment_events_published_total",
    "Payment events the broker confirmed, by type and outcome (routed, or unroutable when"
    " no queue is bound for the type).",
    ["type", "outcome"],
)
OUTBOX_PUBLISH_FAILURES = Counter(
    "payment_events_publish_failures_total",
    "Attempts to publish an outbox event that were not confirmed (it stays in the outbox"
    " and is tried again), by reason.",
    ["reason"],
)
OUTBOX_BACKLOG = Gauge(
    "payment_events_outbox_backlog",
    "Events in the outbox not yet published, as last measured by this relay.",
)
OUTBOX_OLDEST_UNSENT_AGE = Gauge(
    "payment_events_outbox_oldest_unsent_age_seconds",
    "Age of the oldest event not yet published (0 when none waits), as last measured.",
)
