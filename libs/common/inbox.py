"""The processed-message inbox: how a consumer makes redelivery harmless.

A handler claims the message id inside the same transaction as its effect. If the claim
finds the id already there, the effect was committed before (the ack was lost), and the
handler does nothing; if the transaction rolls back, the claim rolls back with it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
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
            SELECT $1, * FROM unnest($2::uuid[], $3::text[])
            ON CONFLICT DO NOTHING
            RETURNING message_id
        """  # noqa: S608
        self._seen_sql = f"SELECT 1 FROM {schema}.inbox WHERE consumer = $1 AND message_id = $2"  # noqa: S608

    async def seen(self, conn: Connection, envelope: Envelope[Any]) -> bool:
        """Whether `envelope` was processed already (for a consumer whose effect spans
        several transactions and claims the message in the last one)."""
        row = await conn.fetchrow(self._seen_sql, self.consumer, envelope.message_id)
        return row is not None

    async def claim(self, conn: Connection, envelope: Envelope[Any]) -> bool:
        """Record `envelope` as processed; False when it already was."""
        return envelope.message_id in await self.claim_all(conn, [envelope])

    async def claim_all(
        self, conn: Connection, envelopes: Sequence[Envelope[Any]]
    ) -> set[uuid.UUID]:
        """Record a batch as processed (one statement); the ids that were not already."""
        rows = await conn.fetch(
            self._claim_sql,
            self.consumer,
            [envelope.message_id for envelope in envelopes],
            [envelope.type for envelope in envelopes],
        )
        return {row["message_id"] for row in rows}
