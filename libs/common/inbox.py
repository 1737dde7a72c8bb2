"""The processed-message inbox: how a consumer makes redelivery harmless.

A handler claims the message id inside the same transaction as its effect. If the claim
finds the id already there, the effect was committed before (the ack was lost), and the
handler does nothing; if the transaction rolls back, the claim rolls back with it.
"""

from __future__ import annotations

from typing import Any

from libs.common.db import Connection
from libs.common.messages import Envelope
from libs.common.tables import PAYMENTS_SCHEMA, RECONCILER_SCHEMA, WEBHOOKS_SCHEMA

_SCHEMAS_WITH_INBOX = frozenset({PAYMENTS_SCHEMA, WEBHOOKS_SCHEMA, RECONCILER_SCHEMA})


class Inbox:
    def __init__(self, schema: str, consumer: str) -> None:
        if schema not in _SCHEMAS_WITH_INBOX:
            raise ValueError(f"schema {schema!r} has no inbox table")
        self.consumer = consumer
        # The schema is one of a fixed set, never user input.
        self._claim_sql = f"""
            INSERT INTO {schema}.inbox (consumer, message_id, message_type)
            VALUES ($1, $2, $3)
            ON CONFLICT DO NOTHING
            RETURNING true
        """  # noqa: S608

    async def claim(self, conn: Connection, envelope: Envelope[Any]) -> bool:
        """Record `envelope` as processed; False when it already was."""
        claimed = await conn.fetchval(
            self._claim_sql, self.consumer, envelope.message_id, envelope.type
        )
        return claimed is True
