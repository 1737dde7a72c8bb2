"""Initial schema: one PostgreSQL schema per owning service.

payments.payments           the payment itself (amount in integer minor units)
payments.payment_events     audit trail: every transition asked for, applied or refused
payments.inbox              messages the payments service has processed
webhooks.webhook_events     every provider callback, stored once, with what became of it
webhooks.inbox
reconciler.reconciliation_logs / reconciliation_items   one row per run / per change
reconciler.inbox
gateway.idempotency_keys    Idempotency-Key replay store (kept at least 24 h)

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMAS = ("payments", "webhooks", "reconciler", "gateway")


def upgrade() -> None:
    for schema in SCHEMAS:
        op.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    # updated_at is the database's job, so no writer can forget it.
    op.execute(
        """
        CREATE FUNCTION payments.set_updated_at() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            NEW.updated_at := now();
            RETURN NEW;
        END
        $$
        """
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="in_flight", nullable=False),
        sa.Column("response_status", sa.SmallInteger(), nullable=True),
        sa.Column("response_body", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('in_flight', 'completed')", name=op.f("ck_idempotency_keys_state_known")
        ),
        sa.CheckConstraint(
            "char_length(key) BETWEEN 1 AND 255", name=op.f("ck_idempotency_keys_key_length")
        ),
        sa.PrimaryKeyConstraint("scope", "key", name=op.f("pk_idempotency_keys")),
        schema="gateway",
    )
    op.create_index(
        op.f("ix_idempotency_keys_expires_at"),
        "idempotency_keys",
        ["expires_at"],
        unique=False,
        schema="gateway",
    )
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("message_type", sa.Text(), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=op.f("pk_inbox")),
        schema="payments",
    )
    op.create_index(
        op.f("ix_inbox_processed_at"), "inbox", ["processed_at"], unique=False, schema="payments"
    )
    op.create_table(
        "payments",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("provider", sa.Text(), nullable=True),
        sa.Column("provider_reference", sa.Text(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("currency ~ '^[A-Z]{3}$'", name=op.f("ck_payments_currency_iso4217")),
        sa.CheckConstraint(
            "jsonb_typeof(metadata) = 'object'", name=op.f("ck_payments_metadata_object")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed', 'refunded')",
            name=op.f("ck_payments_status_known"),
        ),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_payments_amount_positive")),
        sa.CheckConstraint(
            "char_length(customer_id) BETWEEN 1 AND 128",
            name=op.f("ck_payments_customer_id_length"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
        sa.UniqueConstraint("reference", name=op.f("uq_payments_reference")),
        schema="payments",
    )
    op.create_index(
        op.f("ix_payments_created_at_id"),
        "payments",
        ["created_at", "id"],
        unique=False,
        schema="payments",
    )
    op.create_index(
        op.f("ix_payments_customer_id_created_at_id"),
        "payments",
        ["customer_id", "created_at", "id"],
        unique=False,
        schema="payments",
    )
    op.create_index(
        op.f("ix_payments_provider_provider_reference"),
        "payments",
        ["provider", "provider_reference"],
        unique=True,
        schema="payments",
        postgresql_where=sa.text("provider_reference IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_payments_status_created_at_id"),
        "payments",
        ["status", "created_at", "id"],
        unique=False,
        schema="payments",
    )
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("message_type", sa.Text(), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=op.f("pk_inbox")),
        schema="reconciler",
    )
    op.create_index(
        op.f("ix_inbox_processed_at"), "inbox", ["processed_at"], unique=False, schema="reconciler"
    )
    op.create_table(
        "reconciliation_logs",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("trigger", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("checked", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("updated", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("unchanged", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("errors", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "error_details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'completed', 'partial', 'failed', 'skipped')",
            name=op.f("ck_reconciliation_logs_status_known"),
        ),
        sa.CheckConstraint(
            "trigger IN ('cron', 'manual')", name=op.f("ck_reconciliation_logs_trigger_known")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_logs")),
        schema="reconciler",
    )
    op.create_index(
        op.f("ix_reconciliation_logs_started_at"),
        "reconciliation_logs",
        ["started_at"],
        unique=False,
        schema="reconciler",
    )
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("message_type", sa.Text(), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=op.f("pk_inbox")),
        schema="webhooks",
    )
    op.create_index(
        op.f("ix_inbox_processed_at"), "inbox", ["processed_at"], unique=False, schema="webhooks"
    )
    op.create_table(
        "payment_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("payment_id", sa.UUID(), nullable=False),
        sa.Column("from_status", sa.Text(), nullable=True),
        sa.Column("to_status", sa.Text(), nullable=False),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "source IN ('api', 'provider', 'webhook', 'reconciler')",
            name=op.f("ck_payment_events_source_known"),
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"],
            ["payments.payments.id"],
            name=op.f("fk_payment_events_payment_id_payments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_events")),
        schema="payments",
    )
    op.create_index(
        op.f("ix_payment_events_payment_id_id"),
        "payment_events",
        ["payment_id", "id"],
        unique=False,
        schema="payments",
    )
    op.create_table(
        "reconciliation_items",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("payment_id", sa.UUID(), nullable=False),
        sa.Column("from_status", sa.Text(), nullable=False),
        sa.Column("to_status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"],
            ["payments.payments.id"],
            name=op.f("fk_reconciliation_items_payment_id_payments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["reconciler.reconciliation_logs.id"],
            name=op.f("fk_reconciliation_items_run_id_reconciliation_logs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_items")),
        schema="reconciler",
    )
    op.create_index(
        op.f("ix_reconciliation_items_payment_id"),
        "reconciliation_items",
        ["payment_id"],
        unique=False,
        schema="reconciler",
    )
    op.create_index(
        op.f("ix_reconciliation_items_run_id"),
        "reconciliation_items",
        ["run_id"],
        unique=False,
        schema="reconciler",
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("provider_event_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=True),
        sa.Column("claimed_payment_id", sa.Text(), nullable=True),
        sa.Column("payment_id", sa.UUID(), nullable=True),
        sa.Column("raw_body", sa.LargeBinary(), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("signature_scheme", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text(), server_default="received", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "signature_scheme IN ('seed', 'standard')", name=op.f("ck_webhook_events_scheme_known")
        ),
        sa.CheckConstraint(
            "status IN ('received', 'applied', 'refused', 'rejected', 'orphaned', 'ignored')",
            name=op.f("ck_webhook_events_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"],
            ["payments.payments.id"],
            name=op.f("fk_webhook_events_payment_id_payments"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint(
            "provider",
            "provider_event_id",
            name=op.f("uq_webhook_events_provider_provider_event_id"),
        ),
        schema="webhooks",
    )
    op.create_index(
        op.f("ix_webhook_events_payment_id"),
        "webhook_events",
        ["payment_id"],
        unique=False,
        schema="webhooks",
    )
    op.create_index(
        op.f("ix_webhook_events_status_created_at"),
        "webhook_events",
        ["status", "created_at"],
        unique=False,
        schema="webhooks",
    )
    op.execute(
        """
        CREATE TRIGGER payments_set_updated_at BEFORE UPDATE ON payments.payments
        FOR EACH ROW EXECUTE FUNCTION payments.set_updated_at()
        """
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_webhook_events_status_created_at"), table_name="webhook_events", schema="webhooks"
    )
    op.drop_index(
        op.f("ix_webhook_events_payment_id"), table_name="webhook_events", schema="webhooks"
    )
    op.drop_table("webhook_events", schema="webhooks")
    op.drop_index(
        op.f("ix_reconciliation_items_run_id"),
        table_name="reconciliation_items",
        schema="reconciler",
    )
    op.drop_index(
        op.f("ix_reconciliation_items_payment_id"),
        table_name="reconciliation_items",
        schema="reconciler",
    )
    op.drop_table("reconciliation_items", schema="reconciler")
    op.drop_index(
        op.f("ix_payment_events_payment_id_id"), table_name="payment_events", schema="payments"
    )
    op.drop_table("payment_events", schema="payments")
    op.drop_index(op.f("ix_inbox_processed_at"), table_name="inbox", schema="webhooks")
    op.drop_table("inbox", schema="webhooks")
    op.drop_index(
        op.f("ix_reconciliation_logs_started_at"),
        table_name="reconciliation_logs",
        schema="reconciler",
    )
    op.drop_table("reconciliation_logs", schema="reconciler")
    op.drop_index(op.f("ix_inbox_processed_at"), table_name="inbox", schema="reconciler")
    op.drop_table("inbox", schema="reconciler")
    op.drop_index(
        op.f("ix_payments_status_created_at_id"), table_name="payments", schema="payments"
    )
    op.drop_index(
        op.f("ix_payments_provider_provider_reference"),
        table_name="payments",
        schema="payments",
        postgresql_where=sa.text("provider_reference IS NOT NULL"),
    )
    op.drop_index(
        op.f("ix_payments_customer_id_created_at_id"), table_name="payments", schema="payments"
    )
    op.drop_index(op.f("ix_payments_created_at_id"), table_name="payments", schema="payments")
    op.drop_table("payments", schema="payments")
    op.drop_index(op.f("ix_inbox_processed_at"), table_name="inbox", schema="payments")
    op.drop_table("inbox", schema="payments")
    op.drop_index(
        op.f("ix_idempotency_keys_expires_at"), table_name="idempotency_keys", schema="gateway"
    )
    op.drop_table("idempotency_keys", schema="gateway")
    op.execute("DROP FUNCTION payments.set_updated_at()")
    for schema in reversed(SCHEMAS):
        op.execute(f"DROP SCHEMA IF EXISTS {schema}")
