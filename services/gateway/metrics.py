"""The gateway's own metrics (the shared ones are in libs.common.metrics)."""

from prometheus_client import Counter

from libs.common.broker.publisher import (
    BrokerUnavailable,
    MessageNacked,
    MessageUnroutable,
    PublishTimeout,
)
from libs.common.messages import PaymentRequested, ReconciliationRequested, WebhookReceived
from libs.common.metrics import PUBLISH_FAILURES
from libs.common.signing import Scheme

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

# Every known label value starts at 0, so rate() and the alerts see the first failure too.
for _reason in (
    "signature_missing",
    "signature_invalid",
    "signature_timestamp_invalid",
    "signature_timestamp_out_of_tolerance",
):
    SIGNATURE_FAILURES.labels(reason=_reason)
for _scheme in Scheme:
    WEBHOOKS_RECEIVED.labels(scheme=_scheme.value)
# The gateway is the only publisher; these are the messages it sends.
for _message in (PaymentRequested, WebhookReceived, ReconciliationRequested):
    for _failure in (PublishTimeout, MessageUnroutable, MessageNacked, BrokerUnavailable):
        PUBLISH_FAILURES.labels(routing_key=_message.TYPE, reason=_failure.reason)
