"""Events out: the payments outbox (also the event log) and each payment's event sequence.

Every applied transition inserts its event into payments.outbox in the transition's own
statement; the relay publishes unsent rows in id order and stamps published_at. Rows
stay after publishing (the event log API reads them) until pruned past the retention.

payments.event_sequence counts a payment's events; payments that exist before this
migration start at 0, so their first event after it is sequence 1.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: PostgreSQL adds the column without rewriting the table.
    op.add_column(
        "payments",
        sa.Column("event_sequence", sa.Integer(), server_default=sa.text("0"), nullable=False),
        schema="payments",
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("payment_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("correlation_id", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint("sequence > 0", name=op.f("ck_outbox_sequence_positive")),
        sa.CheckConstraint(
            "type ~ '^payment\\.[a-z_]+$'", name=op.f("ck_outbox_type_payment_status")
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"],
            ["payments.payments.id"],
            name=op.f("fk_outbox_payment_id_payments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_id")),
        sa.UniqueConstraint("payment_id", "sequence", name=op.f("uq_outbox_payment_id_sequence")),
        schema="payments",
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        unique=False,
        schema="payments",
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_index(
        op.f("ix_outbox_created_at_id"), "outbox", ["created_at", "id"], schema="payments"
    )
    op.create_index(
        op.f("ix_outbox_type_created_at_id"),
        "outbox",
        ["type", "created_at", "id"],
        schema="payments",
    )


def downgrade() -> None:
    op.drop_table("outbox", schema="payments")
    op.drop_column("payments", "event_sequence", schema="payments")
