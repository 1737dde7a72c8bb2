"""Webhook events: retry schedule for orphans, and a count of duplicates received.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "webhook_events",
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        schema="webhooks",
    )
    op.add_column(
        "webhook_events",
        sa.Column("duplicates", sa.Integer(), server_default=sa.text("0"), nullable=False),
        schema="webhooks",
    )
    op.add_column(
        "webhook_events",
        sa.Column("last_duplicate_at", sa.DateTime(timezone=True), nullable=True),
        schema="webhooks",
    )
    op.create_index(
        op.f("ix_webhook_events_next_attempt_at"),
        "webhook_events",
        ["next_attempt_at"],
        schema="webhooks",
        postgresql_where=sa.text("status = 'orphaned'"),
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_webhook_events_next_attempt_at"), table_name="webhook_events", schema="webhooks"
    )
    op.drop_column("webhook_events", "last_duplicate_at", schema="webhooks")
    op.drop_column("webhook_events", "duplicates", schema="webhooks")
    op.drop_column("webhook_events", "next_attempt_at", schema="webhooks")
