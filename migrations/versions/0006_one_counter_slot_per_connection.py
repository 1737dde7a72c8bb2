"""Each connection adds its counts into a slot of its own, not one slot per row.

0005 puts a row's count in slot `hashtext(id) & 15`, so a statement moving 9 payments
touches up to 9 slots of each status it moves from and to, and holds their row locks
until its commit is flushed. Every other writer's statement touches most of the same
slots, so they queued on each other's commits (seen in the benchmarks as lock waits on
the counter rows behind WAL flushes). Now a statement counts into slot
`pg_backend_pid() & 15`: connections opened one after another have consecutive pids, so
a pool's connections mostly hold different counter rows, and a statement upserts one
row per (status, currency) it changes instead of up to 16. The slot is the same for all
statements of a transaction (a slot drawn per statement let two transactions of several
statements each lock two slots in opposite orders: a deadlock).

A slot's count may now go negative (a payment counted in one slot and moved out of
another); only the sum over the slots means anything, and that is all that is read.
The counts already in place carry over as they are.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNT_PAYMENTS = """
CREATE OR REPLACE FUNCTION payments.count_payments() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    own smallint := pg_backend_pid() % 16;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO payments.payment_stats AS s (status, currency, slot, count, amount_minor)
        SELECT status, currency, own, count(*), sum(amount_minor)
          FROM new_rows
         GROUP BY 1, 2
         ORDER BY 1, 2
        ON CONFLICT (status, currency, slot) DO UPDATE
           SET count = s.count + EXCLUDED.count,
               amount_minor = s.amount_minor + EXCLUDED.amount_minor;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO payments.payment_stats AS s (status, currency, slot, count, amount_minor)
        SELECT status, currency, own, sum(n), sum(amount_minor)
          FROM (SELECT status, currency, -1 AS n, -amount_minor AS amount_minor FROM old_rows
                 UNION ALL
                SELECT status, currency, 1, amount_minor FROM new_rows) AS changes
         GROUP BY 1, 2
        HAVING sum(n) <> 0 OR sum(amount_minor) <> 0
         ORDER BY 1, 2
        ON CONFLICT (status, currency, slot) DO UPDATE
           SET count = s.count + EXCLUDED.count,
               amount_minor = s.amount_minor + EXCLUDED.amount_minor;
    ELSE
        INSERT INTO payments.payment_stats AS s (status, currency, slot, count, amount_minor)
        SELECT status, currency, own, -count(*), -sum(amount_minor)
          FROM old_rows
         GROUP BY 1, 2
         ORDER BY 1, 2
        ON CONFLICT (status, currency, slot) DO UPDATE
           SET count = s.count + EXCLUDED.count,
               amount_minor = s.amount_minor + EXCLUDED.amount_minor;
    END IF;
    RETURN NULL;
END
$$
"""

COUNT_WEBHOOK_EVENTS = """
CREATE OR REPLACE FUNCTION webhooks.count_webhook_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    own smallint := pg_backend_pid() % 16;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO webhooks.webhook_stats AS s (status, slot, count)
        SELECT status, own, count(*) FROM new_rows GROUP BY 1 ORDER BY 1
        ON CONFLICT (status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO webhooks.webhook_stats AS s (status, slot, count)
        SELECT status, own, sum(n)
          FROM (SELECT status, -1 AS n FROM old_rows
                 UNION ALL
                SELECT status, 1 FROM new_rows) AS changes
         GROUP BY 1
        HAVING sum(n) <> 0
         ORDER BY 1
        ON CONFLICT (status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSE
        INSERT INTO webhooks.webhook_stats AS s (status, slot, count)
        SELECT status, own, -count(*) FROM old_rows GROUP BY 1 ORDER BY 1
        ON CONFLICT (status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    END IF;
    RETURN NULL;
END
$$
"""


def _revision_0005() -> object:
    """0005's module, whose functions the downgrade puts back exactly as they were."""
    path = Path(__file__).with_name("0005_statement_level_counters.py")
    spec = importlib.util.spec_from_file_location("_revision_0005", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.execute(COUNT_PAYMENTS)
    op.execute(COUNT_WEBHOOK_EVENTS)


def downgrade() -> None:
    previous = _revision_0005()
    for name in ("COUNT_PAYMENTS", "COUNT_WEBHOOK_EVENTS"):
        sql: str = getattr(previous, name)
        op.execute(sql.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
