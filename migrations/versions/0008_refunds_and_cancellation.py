"""Refunds and cancellation.

- payments.payments: two new statuses (partially_refunded, canceled) in the status check;
  `owner`, the API key that created the payment (only it may refund or cancel); and
  `charge_requested_at`, the claim the payments service takes under the row lock before
  it first asks the provider to charge, after which a cancel is refused.
- payments.refunds: a payment's refunds, each with its own status.
- provider.refunds: the simulated PSP's refunds, one per merchant refund id; its webhook
  deliveries name the refund they announce.

Existing rows need nothing: old payments have no owner (any key may refund them, as any
key could read them) and no charge claim (they are past pending, or the reconciler
claims them before it resubmits).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = ("pending", "processing", "completed", "failed", "refunded")
NEW_STATUSES = (
    "pending",
    "processing",
    "completed",
    "failed",
    "partially_refunded",
    "refunded",
    "canceled",
)


def _one_of(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _payment_statuses(values: Sequence[str]) -> None:
    op.drop_constraint("ck_payments_status_known", "payments", schema="payments")
    op.create_check_constraint(
        op.f("ck_payments_status_known"),
        "payments",
        _one_of("status", values),
        schema="payments",
    )


def upgrade() -> None:
    _payment_statuses(NEW_STATUSES)
    op.add_column("payments", sa.Column("owner", sa.Text(), nullable=True), schema="payments")
    op.add_column(
        "payments",
        sa.Column("charge_requested_at", sa.DateTime(timezone=True), nullable=True),
        schema="payments",
    )

    op.create_table(
        "refunds",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("payment_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("provider_refund_id", sa.Text(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("correlation_id", sa.Text(), nullable=True),
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
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_refunds_amount_positive")),
        sa.CheckConstraint(
            _one_of("status", ("pending", "succeeded", "failed")),
            name=op.f("ck_refunds_status_known"),
        ),
        sa.CheckConstraint(
            "reason IS NULL OR char_length(reason) <= 500", name=op.f("ck_refunds_reason_length")
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"],
            ["payments.payments.id"],
            name=op.f("fk_refunds_payment_id_payments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
        schema="payments",
    )
    op.create_index(
        op.f("ix_refunds_payment_id_created_at"),
        "refunds",
        ["payment_id", "created_at"],
        schema="payments",
    )
    op.create_index(
        op.f("ix_refunds_created_at"),
        "refunds",
        ["created_at"],
        schema="payments",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        op.f("ix_refunds_provider_refund_id"),
        "refunds",
        ["provider_refund_id"],
        unique=True,
        schema="payments",
        postgresql_where=sa.text("provider_refund_id IS NOT NULL"),
    )
    # updated_at is the database's job, as for payments.
    op.execute(
        "CREATE TRIGGER refunds_set_updated_at BEFORE UPDATE ON payments.refunds"
        " FOR EACH ROW EXECUTE FUNCTION payments.set_updated_at()"
    )

    op.create_table(
        "refunds",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("charge_id", sa.Text(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("settle_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_refunds_amount_positive")),
        sa.CheckConstraint(
            _one_of("status", ("processing", "succeeded", "failed")),
            name=op.f("ck_refunds_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["charge_id"],
            ["provider.charges.id"],
            name=op.f("fk_refunds_charge_id_charges"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_refunds_idempotency_key")),
        schema="provider",
    )
    op.create_index(op.f("ix_refunds_charge_id"), "refunds", ["charge_id"], schema="provider")
    op.create_index(op.f("ix_refunds_reference"), "refunds", ["reference"], schema="provider")
    op.create_index(
        op.f("ix_refunds_settle_at"),
        "refunds",
        ["settle_at"],
        schema="provider",
        postgresql_where=sa.text("status = 'processing'"),
    )
    op.add_column(
        "webhook_deliveries", sa.Column("refund_id", sa.Text(), nullable=True), schema="provider"
    )
    op.create_foreign_key(
        op.f("fk_webhook_deliveries_refund_id_refunds"),
        "webhook_deliveries",
        "refunds",
        ["refund_id"],
        ["id"],
        source_schema="provider",
        referent_schema="provider",
        ondelete="CASCADE",
    )
    op.create_index(
        op.f("ix_webhook_deliveries_refund_id"),
        "webhook_deliveries",
        ["refund_id"],
        schema="provider",
    )


def downgrade() -> None:
    # Payments in a status the old schema does not know cannot stay: say so rather than
    # silently rewrite their history.
    op.execute(
        f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM payments.payments
                        WHERE NOT ({_one_of("status", OLD_STATUSES)})) THEN
                RAISE EXCEPTION 'payments in status partially_refunded or canceled exist;'
                                ' the previous revision cannot hold them';
            END IF;
        END
        $$
        """  # noqa: S608 - built from the constant status list
    )
    op.drop_index(
        op.f("ix_webhook_deliveries_refund_id"), table_name="webhook_deliveries", schema="provider"
    )
    op.drop_constraint(
        op.f("fk_webhook_deliveries_refund_id_refunds"),
        "webhook_deliveries",
        schema="provider",
        type_="foreignkey",
    )
    op.drop_column("webhook_deliveries", "refund_id", schema="provider")
    op.drop_table("refunds", schema="provider")
    op.drop_table("refunds", schema="payments")
    op.drop_column("payments", "charge_requested_at", schema="payments")
    op.drop_column("payments", "owner", schema="payments")
    _payment_statuses(OLD_STATUSES)
