"""The database schema, as SQLAlchemy Core metadata: the source of truth for migrations.

One PostgreSQL schema per owning service. Services query with plain SQL through asyncpg,
each schema only through its owner's module (`libs.common.state_machine` and
`payments_store`, `webhooks_store`, `reconciler_store`; the gateway's and the provider's
own modules for theirs); these definitions are what Alembic migrations are
written from and checked against (tests/integration/test_migrations.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from libs.common.states import PaymentStatus, RefundStatus, TransitionSource

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PAYMENTS_SCHEMA = "payments"
WEBHOOKS_SCHEMA = "webhooks"
RECONCILER_SCHEMA = "reconciler"
GATEWAY_SCHEMA = "gateway"
PROVIDER_SCHEMA = "provider"
SERVICE_SCHEMAS = (
    PAYMENTS_SCHEMA,
    WEBHOOKS_SCHEMA,
    RECONCILER_SCHEMA,
    GATEWAY_SCHEMA,
    PROVIDER_SCHEMA,
)

metadata = MetaData(naming_convention=NAMING_CONVENTION)

NOW = text("now()")


def _created_at() -> Column[object]:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW)


def _one_of(column: str, values: Iterable[str]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


def _inbox(schema: str) -> Table:
    """Ids of messages a consumer has processed; inserted in the transaction of their effect."""
    return Table(
        "inbox",
        metadata,
        Column("consumer", Text, nullable=False),
        Column("message_id", UUID(as_uuid=True), nullable=False),
        Column("message_type", Text, nullable=False),
        Column("processed_at", DateTime(timezone=True), nullable=False, server_default=NOW),
        PrimaryKeyConstraint("consumer", "message_id"),
        Index(None, "processed_at"),
        schema=schema,
    )


# --- payments -------------------------------------------------------------------------------

payments = Table(
    "payments",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("reference", Text, nullable=False, unique=True),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", Text, nullable=False),
    Column("customer_id", Text, nullable=False),
    Column("description", Text, nullable=True),
    Column("status", Text, nullable=False, server_default=PaymentStatus.PENDING.value),
    Column("provider", Text, nullable=True),
    Column("provider_reference", Text, nullable=True),
    Column("failure_reason", Text, nullable=True),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # How many events this payment has put in the outbox: the last one's sequence number.
    # Raised by the transition's own UPDATE, under its row lock, so no two events of a
    # payment share a number and none is skipped.
    Column("event_sequence", Integer, nullable=False, server_default=text("0")),
    # The API key (its id, as services.gateway.access names it) that created the payment;
    # only that key may refund or cancel it. NULL for payments made before it was recorded.
    Column("owner", Text, nullable=True),
    # Set, under the row lock, before the provider is first asked to charge: from then on
    # the payment can no longer be canceled (see libs.common.cancellation).
    Column("charge_requested_at", DateTime(timezone=True), nullable=True),
    _created_at(),
    # Kept current by the trigger payments.set_updated_at (see the initial migration).
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
    CheckConstraint("currency ~ '^[A-Z]{3}$'", name="currency_iso4217"),
    CheckConstraint("char_length(customer_id) BETWEEN 1 AND 128", name="customer_id_length"),
    CheckConstraint(_one_of("status", [s.value for s in PaymentStatus]), name="status_known"),
    CheckConstraint("jsonb_typeof(metadata) = 'object'", name="metadata_object"),
    # Listing: newest first, keyset pagination on (created_at, id), optionally filtered.
    Index(None, "created_at", "id"),
    Index(None, "status", "created_at", "id"),
    Index(None, "customer_id", "created_at", "id"),
    # One payment per provider charge.
    Index(
        None,
        "provider",
        "provider_reference",
        unique=True,
        postgresql_where=text("provider_reference IS NOT NULL"),
    ),
    schema=PAYMENTS_SCHEMA,
)

payment_events = Table(
    "payment_events",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column(
        "payment_id",
        UUID(as_uuid=True),
        ForeignKey(payments.c.id, ondelete="CASCADE"),
        nullable=False,
    ),
    # NULL only for the creation event.
    Column("from_status", Text, nullable=True),
    Column("to_status", Text, nullable=False),
    Column("applied", Boolean, nullable=False),
    Column("source", Text, nullable=False),
    Column("reason", Text, nullable=True),
    Column("correlation_id", Text, nullable=True),
    _created_at(),
    CheckConstraint(_one_of("source", [s.value for s in TransitionSource]), name="source_known"),
    Index(None, "payment_id", "id"),
    schema=PAYMENTS_SCHEMA,
)

payments_inbox = _inbox(PAYMENTS_SCHEMA)

# The transactional outbox and the event log in one: every applied transition's event,
# inserted by the transition's own statement (libs/common/state_machine.py), published
# by the relay (libs/common/outbox.py), kept after publishing for the event log API and
# pruned once older than EVENT_RETENTION_DAYS.
outbox = Table(
    "outbox",
    metadata,
    # The relay publishes in this order, so one payment's events leave in sequence.
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    # The bus message's message_id, the same on every publish of this event.
    Column("event_id", UUID(as_uuid=True), nullable=False, unique=True),
    Column(
        "payment_id",
        UUID(as_uuid=True),
        ForeignKey(payments.c.id, ondelete="CASCADE"),
        nullable=False,
    ),
    Column("sequence", Integer, nullable=False),
    # The routing key: payment.<new status>.
    Column("type", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("correlation_id", Text, nullable=False),
    _created_at(),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    UniqueConstraint("payment_id", "sequence"),
    CheckConstraint("sequence > 0", name="sequence_positive"),
    CheckConstraint("type ~ '^payment\\.[a-z_]+$'", name="type_payment_status"),
    # What the relay reads: the unsent events, oldest first.
    Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
    # The event log: newest first, keyset pagination on (created_at, id), optionally by type.
    Index(None, "created_at", "id"),
    Index(None, "type", "created_at", "id"),
    schema=PAYMENTS_SCHEMA,
)

# Kept by the triggers payments_count_* (migrations 0005 and 0006), so that
# /api/payments/stats never scans payments. Each total is spread over several slot rows,
# so concurrent writers rarely wait on one another; the triggers choose the slot, and
# readers add the slots up.
payment_stats = Table(
    "payment_stats",
    metadata,
    Column("status", Text, nullable=False),
    Column("currency", Text, nullable=False),
    Column("slot", SmallInteger, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    PrimaryKeyConstraint("status", "currency", "slot"),
    schema=PAYMENTS_SCHEMA,
)

REFUND_REASON_MAX_LENGTH = 500

# A payment's refunds. Written only through libs.common.refunds: a refund is inserted
# under its payment's row lock after adding up the payment's other refunds, so the
# refunds not failed never add up to more than the payment's amount.
refunds = Table(
    "refunds",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column(
        "payment_id",
        UUID(as_uuid=True),
        ForeignKey(payments.c.id, ondelete="CASCADE"),
        nullable=False,
    ),
    Column("amount_minor", BigInteger, nullable=False),
    # The payment's currency, kept with the refund for the stats.
    Column("currency", Text, nullable=False),
    Column("reason", Text, nullable=True),
    Column("status", Text, nullable=False, server_default=RefundStatus.PENDING.value),
    Column("failure_reason", Text, nullable=True),
    # The provider's id for this refund, once it answered.
    Column("provider_refund_id", Text, nullable=True),
    # When the provider was first asked (NULL: not yet, so the gateway may still withdraw it).
    Column("submitted_at", DateTime(timezone=True), nullable=True),
    Column("settled_at", DateTime(timezone=True), nullable=True),
    Column("correlation_id", Text, nullable=True),
    _created_at(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
    CheckConstraint(_one_of("status", [s.value for s in RefundStatus]), name="status_known"),
    CheckConstraint(
        f"reason IS NULL OR char_length(reason) <= {REFUND_REASON_MAX_LENGTH}",
        name="reason_length",
    ),
    Index(None, "payment_id", "created_at"),
    # The reconciler's walk over refunds still pending.
    Index(None, "created_at", postgresql_where=text("status = 'pending'")),
    Index(
        None,
        "provider_refund_id",
        unique=True,
        postgresql_where=text("provider_refund_id IS NOT NULL"),
    ),
    schema=PAYMENTS_SCHEMA,
)

# --- webhooks -------------------------------------------------------------------------------

WEBHOOK_EVENT_STATUSES = ("received", "applied", "refused", "rejected", "orphaned", "ignored")
SIGNATURE_SCHEMES = ("seed", "standard")

webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("provider", Text, nullable=False),
    # The provider's event id, or the SHA-256 of the raw body when the payload has none.
    Column("provider_event_id", Text, nullable=False),
    Column("event_type", Text, nullable=True),
    # What the payload claims, kept even when no such payment exists (yet).
    Column("claimed_payment_id", Text, nullable=True),
    Column(
        "payment_id",
        UUID(as_uuid=True),
        ForeignKey(payments.c.id, ondelete="SET NULL"),
        nullable=True,
    ),
    Column("raw_body", LargeBinary, nullable=False),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("signature_scheme", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("verified_at", DateTime(timezone=True), nullable=False),
    Column("status", Text, nullable=False, server_default="received"),
    Column("error", Text, nullable=True),
    Column("attempts", SmallInteger, nullable=False, server_default=text("0")),
    Column("processed_at", DateTime(timezone=True), nullable=True),
    # An orphan (its payment unknown yet) is tried again from this moment on.
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    # The same event received again: counted, never applied again.
    Column("duplicates", Integer, nullable=False, server_default=text("0")),
    Column("last_duplicate_at", DateTime(timezone=True), nullable=True),
    _created_at(),
    UniqueConstraint("provider", "provider_event_id"),
    CheckConstraint(_one_of("status", WEBHOOK_EVENT_STATUSES), name="status_known"),
    CheckConstraint(_one_of("signature_scheme", SIGNATURE_SCHEMES), name="scheme_known"),
    Index(None, "payment_id"),
    Index(None, "status", "created_at"),
    Index(None, "next_attempt_at", postgresql_where=text("status = 'orphaned'")),
    schema=WEBHOOKS_SCHEMA,
)

webhooks_inbox = _inbox(WEBHOOKS_SCHEMA)

# Kept by the trigger webhooks.count_webhook_event.
webhook_stats = Table(
    "webhook_stats",
    metadata,
    Column("status", Text, nullable=False),
    Column("slot", SmallInteger, nullable=False),
    Column("count", BigInteger, nullable=False),
    PrimaryKeyConstraint("status", "slot"),
    schema=WEBHOOKS_SCHEMA,
)

# --- reconciler -----------------------------------------------------------------------------

RECONCILIATION_TRIGGERS = ("cron", "manual")
RECONCILIATION_STATUSES = ("running", "completed", "partial", "failed", "skipped")

reconciliation_logs = Table(
    "reconciliation_logs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("trigger", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("checked", Integer, nullable=False, server_default=text("0")),
    Column("updated", Integer, nullable=False, server_default=text("0")),
    Column("unchanged", Integer, nullable=False, server_default=text("0")),
    Column("errors", Integer, nullable=False, server_default=text("0")),
    Column("error_details", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("duration_ms", Integer, nullable=True),
    Column("correlation_id", Text, nullable=True),
    CheckConstraint(_one_of("trigger", RECONCILIATION_TRIGGERS), name="trigger_known"),
    CheckConstraint(_one_of("status", RECONCILIATION_STATUSES), name="status_known"),
    Index(None, "started_at"),
    schema=RECONCILER_SCHEMA,
)

reconciliation_items = Table(
    "reconciliation_items",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column(
        "run_id",
        UUID(as_uuid=True),
        ForeignKey(reconciliation_logs.c.id, ondelete="CASCADE"),
        nullable=False,
    ),
    Column(
        "payment_id",
        UUID(as_uuid=True),
        ForeignKey(payments.c.id, ondelete="CASCADE"),
        nullable=False,
    ),
    Column("from_status", Text, nullable=False),
    Column("to_status", Text, nullable=False),
    Column("reason", Text, nullable=True),
    _created_at(),
    Index(None, "run_id"),
    Index(None, "payment_id"),
    schema=RECONCILER_SCHEMA,
)

reconciler_inbox = _inbox(RECONCILER_SCHEMA)

# --- gateway --------------------------------------------------------------------------------

IDEMPOTENCY_STATES = ("in_flight", "completed")

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    # Who the key belongs to (an API key's id, or "anonymous" without API auth).
    Column("scope", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("request_hash", Text, nullable=False),
    Column("state", Text, nullable=False, server_default="in_flight"),
    Column("response_status", SmallInteger, nullable=True),
    # The answer for this key, prepared before publishing (the payment id is fixed then,
    # so a retry after a crash publishes the same payment again, never a second one).
    Column("response_body", JSONB, nullable=True),
    _created_at(),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    # While in flight: past this moment the holder is presumed dead and a retry takes over.
    Column("locked_until", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("scope", "key"),
    CheckConstraint(_one_of("state", IDEMPOTENCY_STATES), name="state_known"),
    CheckConstraint("char_length(key) BETWEEN 1 AND 255", name="key_length"),
    Index(None, "expires_at"),
    schema=GATEWAY_SCHEMA,
)

# --- provider (the simulated PSP's own state) -------------------------------------------------

CHARGE_STATUSES = ("processing", "succeeded", "declined")
PROVIDER_REFUND_STATUSES = ("processing", "succeeded", "failed")
DELIVERY_STATES = ("pending", "delivered", "dropped", "failed")

charges = Table(
    "charges",
    metadata,
    Column("id", Text, primary_key=True),
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("request_hash", Text, nullable=False),
    # The merchant's payment id; not a foreign key: the provider is another company.
    Column("payment_id", UUID(as_uuid=True), nullable=False),
    Column("reference", Text, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", Text, nullable=False),
    Column("customer_id", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("decline_reason", Text, nullable=True),
    Column("settle_at", DateTime(timezone=True), nullable=False),
    Column("settled_at", DateTime(timezone=True), nullable=True),
    # The merchant request's correlation id, echoed on this charge's webhooks (as a
    # PSP's metadata passthrough), so one payment's story reads across services.
    Column("correlation_id", Text, nullable=True),
    _created_at(),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
    CheckConstraint(_one_of("status", CHARGE_STATUSES), name="status_known"),
    Index(None, "payment_id"),
    Index(None, "settle_at", postgresql_where=text("status = 'processing'")),
    schema=PROVIDER_SCHEMA,
)

provider_refunds = Table(
    "refunds",
    metadata,
    Column("id", Text, primary_key=True),
    # The merchant's refund id: one refund per key, however often it is asked.
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("request_hash", Text, nullable=False),
    Column("charge_id", Text, ForeignKey(charges.c.id, ondelete="CASCADE"), nullable=False),
    # The merchant's refund id as it sent it in the body (what it looks refunds up by).
    Column("reference", Text, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("failure_reason", Text, nullable=True),
    Column("settle_at", DateTime(timezone=True), nullable=False),
    Column("settled_at", DateTime(timezone=True), nullable=True),
    Column("correlation_id", Text, nullable=True),
    _created_at(),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
    CheckConstraint(_one_of("status", PROVIDER_REFUND_STATUSES), name="status_known"),
    Index(None, "charge_id"),
    Index(None, "reference"),
    Index(None, "settle_at", postgresql_where=text("status = 'processing'")),
    schema=PROVIDER_SCHEMA,
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    # The event id the merchant deduplicates on.
    Column("id", Text, primary_key=True),
    Column("charge_id", Text, ForeignKey(charges.c.id, ondelete="CASCADE"), nullable=False),
    # Set for a refund's events (whose charge_id is the refunded charge).
    Column(
        "refund_id",
        Text,
        ForeignKey(provider_refunds.c.id, ondelete="CASCADE"),
        nullable=True,
    ),
    Column("event_type", Text, nullable=False),
    # Exactly the bytes sent (and signed) on every attempt.
    Column("body", LargeBinary, nullable=False),
    Column("state", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("last_status", SmallInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    _created_at(),
    CheckConstraint(_one_of("state", DELIVERY_STATES), name="state_known"),
    Index(None, "charge_id"),
    Index(None, "refund_id"),
    Index(None, "next_attempt_at", postgresql_where=text("state = 'pending'")),
    schema=PROVIDER_SCHEMA,
)
