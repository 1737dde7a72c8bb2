"""The stats counters are kept per statement, not per row.

The row-level triggers of 0002 upsert one counter row per payment (or webhook event),
in whatever order the statement produces rows. A statement that writes many rows (the
payments service stores and moves a batch at a time) then locks counter rows in an
arbitrary order, and two such statements deadlock on them. These statement-level
triggers read the statement's transition tables, add the changes up per counter row and
upsert each counter once, in key order: one upsert per counter instead of one or two per
row, and every statement locks counters in the same order.

Same counters, same slots (`hashtext(id) & 15`), so the counts carry over as they are.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A trigger with transition tables handles one event, so each table gets three triggers
# sharing one function that branches on TG_OP. UPDATE triggers cannot name columns
# either: an update that moves no counter adds up to nothing and writes nothing.
COUNT_PAYMENTS = """
CREATE FUNCTION payments.count_payments() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO payments.payment_stats AS s (status, currency, slot, count, amount_minor)
        SELECT status, currency, hashtext(id::text) & 15, count(*), sum(amount_minor)
          FROM new_rows
         GROUP BY 1, 2, 3
         ORDER BY 1, 2, 3
        ON CONFLICT (status, currency, slot) DO UPDATE
           SET count = s.count + EXCLUDED.count,
               amount_minor = s.amount_minor + EXCLUDED.amount_minor;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO payments.payment_stats AS s (status, currency, slot, count, amount_minor)
        SELECT status, currency, slot, sum(n), sum(amount_minor)
          FROM (SELECT status, currency, hashtext(id::text) & 15 AS slot, -1 AS n,
                       -amount_minor AS amount_minor
                  FROM old_rows
                 UNION ALL
                SELECT status, currency, hashtext(id::text) & 15, 1, amount_minor
                  FROM new_rows) AS changes
         GROUP BY 1, 2, 3
        HAVING sum(n) <> 0 OR sum(amount_minor) <> 0
         ORDER BY 1, 2, 3
        ON CONFLICT (status, currency, slot) DO UPDATE
           SET count = s.count + EXCLUDED.count,
               amount_minor = s.amount_minor + EXCLUDED.amount_minor;
    ELSE
        INSERT INTO payments.payment_stats AS s (status, currency, slot, count, amount_minor)
        SELECT status, currency, hashtext(id::text) & 15, -count(*), -sum(amount_minor)
          FROM old_rows
         GROUP BY 1, 2, 3
         ORDER BY 1, 2, 3
        ON CONFLICT (status, currency, slot) DO UPDATE
           SET count = s.count + EXCLUDED.count,
               amount_minor = s.amount_minor + EXCLUDED.amount_minor;
    END IF;
    RETURN NULL;
END
$$
"""

COUNT_WEBHOOK_EVENTS = """
CREATE FUNCTION webhooks.count_webhook_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO webhooks.webhook_stats AS s (status, slot, count)
        SELECT status, hashtext(id::text) & 15, count(*)
          FROM new_rows
         GROUP BY 1, 2
         ORDER BY 1, 2
        ON CONFLICT (status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO webhooks.webhook_stats AS s (status, slot, count)
        SELECT status, slot, sum(n)
          FROM (SELECT status, hashtext(id::text) & 15 AS slot, -1 AS n FROM old_rows
                 UNION ALL
                SELECT status, hashtext(id::text) & 15, 1 FROM new_rows) AS changes
         GROUP BY 1, 2
        HAVING sum(n) <> 0
         ORDER BY 1, 2
        ON CONFLICT (status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSE
        INSERT INTO webhooks.webhook_stats AS s (status, slot, count)
        SELECT status, hashtext(id::text) & 15, -count(*)
          FROM old_rows
         GROUP BY 1, 2
         ORDER BY 1, 2
        ON CONFLICT (status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    END IF;
    RETURN NULL;
END
$$
"""

_TRIGGERS = {
    ("payments.payments", "payments.count_payments()"): "payments_count",
    ("webhooks.webhook_events", "webhooks.count_webhook_events()"): "webhook_events_count",
}
_TRANSITION_TABLES = {
    "INSERT": "REFERENCING NEW TABLE AS new_rows",
    "UPDATE": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "DELETE": "REFERENCING OLD TABLE AS old_rows",
}

# The row-level triggers of 0002, for the downgrade.
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
    # No write may slip between dropping the old triggers and creating the new ones.
    op.execute("LOCK TABLE payments.payments, webhooks.webhook_events IN SHARE ROW EXCLUSIVE MODE")
    op.execute("DROP TRIGGER payments_count_update ON payments.payments")
    op.execute("DROP TRIGGER payments_count_insert_delete ON payments.payments")
    op.execute("DROP FUNCTION payments.count_payment()")
    op.execute("DROP TRIGGER webhook_events_count_update ON webhooks.webhook_events")
    op.execute("DROP TRIGGER webhook_events_count_insert_delete ON webhooks.webhook_events")
    op.execute("DROP FUNCTION webhooks.count_webhook_event()")
    op.execute(COUNT_PAYMENTS)
    op.execute(COUNT_WEBHOOK_EVENTS)
    for (table, function), prefix in _TRIGGERS.items():
        for event, tables in _TRANSITION_TABLES.items():
            op.execute(
                f"CREATE TRIGGER {prefix}_{event.lower()} AFTER {event} ON {table}"
                f" {tables} FOR EACH STATEMENT EXECUTE FUNCTION {function}"
            )


def downgrade() -> None:
    op.execute("LOCK TABLE payments.payments, webhooks.webhook_events IN SHARE ROW EXCLUSIVE MODE")
    for (table, function), prefix in _TRIGGERS.items():
        for event in _TRANSITION_TABLES:
            op.execute(f"DROP TRIGGER {prefix}_{event.lower()} ON {table}")
        op.execute(f"DROP FUNCTION {function}")
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
