"""The simulated provider keeps the correlation id of the request that created a charge.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "charges", sa.Column("correlation_id", sa.Text(), nullable=True), schema="provider"
    )


def downgrade() -> None:
    op.drop_column("charges", "correlation_id", schema="provider")
