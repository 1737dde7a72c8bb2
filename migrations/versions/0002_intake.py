"""Payment intake: the simulated provider's schema, stats counters, idempotency lock.

provider.charges / provider.webhook_deliveries   the simulated PSP's own state
payments.payment_stats, webhooks.webhook_stats   counters kept by triggers, so stats
                                                 never scan the big tables
gateway.idempotency_keys.locked_until            lets a retry take over a key whose
                                                 holder died mid-request

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each row counts in slot `hashtext(id) & 15`: 16 slots.

COUNT_PAYMENT = """
CREATE FUNCTION payments.count_payment() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE payments.payment_stats
           SET count = count - 1, amount_minor = amount_minor - OLD.amount_minor
         WHERE status = OLD.status AND currency = OLD.currency
           AND slot = hashtext(OLD.id::text) & 15;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO payments.payment_stats AS s (status, currency, slot, count, amount_minor)
        VALUES (NEW.status, NEW.currency, hashtext(NEW.id::text) & 15, 1, NEW.amount_minor)
        ON CONFLICT (status, currency, slot) DO UPDATE
           SET count = s.count + 1, amount_minor = s.amount_minor + EXCLUDED.amount_minor;
    END IF;
    RETURN NULL;
END
$$
"""

COUNT_WEBHOOK_EVENT = """
CREATE FUNCTION webhooks.count_webhook_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE webhooks.webhook_stats SET count = count - 1
         WHERE status = OLD.status AND slot = hashtext(OLD.id::text) & 15;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO webhooks.webhook_stats AS s (status, slot, count)
        VALUES (NEW.status, hashtext(NEW.id::text) & 15, 1)
        ON CONFLICT (status, slot) DO UPDATE SET count = s.count + 1;
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS provider")
    op.create_table(
        "payment_stats",
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("slot", sa.SmallInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("status", "currency", "slot", name=op.f("pk_payment_stats")),
        schema="payments",
    )
    op.create_table(
        "charges",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("payment_id", sa.UUID(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("decline_reason", sa.Text(), nullable=True),
        sa.Column("settle_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('processing', 'succeeded', 'declined')",
            name=op.f("ck_charges_status_known"),
        ),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_charges_amount_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_charges")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_charges_idempotency_key")),
        schema="provider",
    )
    op.create_index(
        op.f("ix_charges_payment_id"), "charges", ["payment_id"], unique=False, schema="provider"
    )
    op.create_index(
        op.f("ix_charges_settle_at"),
        "charges",
        ["settle_at"],
        unique=False,
        schema="provider",
        postgresql_where=sa.text("status = 'processing'"),
    )
    op.create_table(
        "webhook_stats",
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("slot", sa.SmallInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("status", "slot", name=op.f("pk_webhook_stats")),
        schema="webhooks",
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("charge_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_status", sa.SmallInteger(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'dropped', 'failed')",
            name=op.f("ck_webhook_deliveries_state_known"),
        ),
        sa.ForeignKeyConstraint(
            ["charge_id"],
            ["provider.charges.id"],
            name=op.f("fk_webhook_deliveries_charge_id_charges"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        schema="provider",
    )
    op.create_index(
        op.f("ix_webhook_deliveries_charge_id"),
        "webhook_deliveries",
        ["charge_id"],
        unique=False,
        schema="provider",
    )
    op.create_index(
        op.f("ix_webhook_deliveries_next_attempt_at"),
        "webhook_deliveries",
        ["next_attempt_at"],
        unique=False,
        schema="provider",
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.add_column(
        "idempotency_keys",
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        schema="gateway",
    )

    # Counters: block writers while the triggers go in and the counts are taken, so
    # no row is counted twice or missed.
    op.execute("LOCK TABLE payments.payments, webhooks.webhook_events IN SHARE MODE")
    op.execute(COUNT_PAYMENT)
    op.execute(
        """
        CREATE TRIGGER payments_count_insert_delete AFTER INSERT OR DELETE ON payments.payments
        FOR EACH ROW EXECUTE FUNCTION payments.count_payment()
        """
    )
    op.execute(
        """
        CREATE TRIGGER payments_count_update AFTER UPDATE ON payments.payments
        FOR EACH ROW WHEN (
            OLD.status IS DISTINCT FROM NEW.status
            OR OLD.currency IS DISTINCT FROM NEW.currency
            OR OLD.amount_minor IS DISTINCT FROM NEW.amount_minor
        ) EXECUTE FUNCTION payments.count_payment()
        """
    )
    op.execute(
        """
        INSERT INTO payments.payment_stats (status, currency, slot, count, amount_minor)
        SELECT status, currency, hashtext(id::text) & 15, count(*), sum(amount_minor)
          FROM payments.payments GROUP BY 1, 2, 3
        """
    )
    op.execute(COUNT_WEBHOOK_EVENT)
    op.execute(
        """
        CREATE TRIGGER webhook_events_count_insert_delete
        AFTER INSERT OR DELETE ON webhooks.webhook_events
        FOR EACH ROW EXECUTE FUNCTION webhooks.count_webhook_event()
        """
    )
    op.execute(
        """
        CREATE TRIGGER webhook_events_count_update AFTER UPDATE ON webhooks.webhook_events
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
        EXECUTE FUNCTION webhooks.count_webhook_event()
        """
    )
    op.execute(
        """
        INSERT INTO webhooks.webhook_stats (status, slot, count)
        SELECT status, hashtext(id::text) & 15, count(*)
          FROM webhooks.webhook_events GROUP BY 1, 2
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER webhook_events_count_update ON webhooks.webhook_events")
    op.execute("DROP TRIGGER webhook_events_count_insert_delete ON webhooks.webhook_events")
    op.execute("DROP FUNCTION webhooks.count_webhook_event()")
    op.execute("DROP TRIGGER payments_count_update ON payments.payments")
    op.execute("DROP TRIGGER payments_count_insert_delete ON payments.payments")
    op.execute("DROP FUNCTION payments.count_payment()")
    op.drop_column("idempotency_keys", "locked_until", schema="gateway")
    op.drop_index(
        op.f("ix_webhook_deliveries_next_attempt_at"),
        table_name="webhook_deliveries",
        schema="provider",
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.drop_index(
        op.f("ix_webhook_deliveries_charge_id"), table_name="webhook_deliveries", schema="provider"
    )
    op.drop_table("webhook_deliveries", schema="provider")
    op.drop_table("webhook_stats", schema="webhooks")
    op.drop_index(
        op.f("ix_charges_settle_at"),
        table_name="charges",
        schema="provider",
        postgresql_where=sa.text("status = 'processing'"),
    )
    op.drop_index(op.f("ix_charges_payment_id"), table_name="charges", schema="provider")
    op.drop_table("charges", schema="provider")
    op.drop_table("payment_stats", schema="payments")
    op.execute("DROP SCHEMA IF EXISTS provider")
