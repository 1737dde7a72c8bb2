"""Provider callbacks: verify the signature over the raw bytes, then hand the event on.

Nothing is parsed before the signature checks out, and nothing is published unless it
does. The webhooks service stores and applies the event; the gateway only answers once
the broker has it, so a 2xx to the provider means the event cannot be lost.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from asyncpg import Record

from libs.common import webhooks_store
from libs.common.broker.publisher import PublishError
from libs.common.db import Connection, Database
from libs.common.errors import ApiError, service_unavailable
from libs.common.messages import WebhookReceived, wrap
from libs.common.payments_store import status_of
from libs.common.signing import (
    ID_HEADER,
    SEED_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    verify,
)
from libs.common.states import PaymentStatus
from libs.common.webhook_events import InvalidEvent, parse_event
from services.gateway.intake import Publish
from services.gateway.metrics import SIGNATURE_FAILURES, WEBHOOKS_RECEIVED

log = logging.getLogger(__name__)

MAX_WEBHOOK_BYTES = 256 * 1024
# What is kept of the request besides its body: enough to re-verify and to explain.
KEPT_HEADERS = (
    "Content-Type",
    "User-Agent",
    SEED_HEADER,
    ID_HEADER,
    TIMESTAMP_HEADER,
    SIGNATURE_HEADER,
)


async def receive_webhook(
    raw: bytes,
    headers: Mapping[str, str],
    *,
    secrets: Sequence[str],
    publish: Publish,
    db: Database,
) -> dict[str, Any]:
    received_at = dt.datetime.now(dt.UTC)
    try:
        scheme = verify(raw, headers, secrets)
    except SignatureError as exc:
        SIGNATURE_FAILURES.labels(reason=exc.code).inc()
        raise ApiError(401, exc.code, exc.message) from None
    try:
        event = parse_event(raw)
    except InvalidEvent as exc:
        raise ApiError(
            400, "invalid_webhook", f"The webhook body is not an event: {exc}."
        ) from None
    if event.trailing_bytes:
        log.warning("bytes after the webhook's JSON object ignored", extra={"event": str(event.id)})

    envelope = wrap(
        WebhookReceived(
            raw_body=base64.b64encode(raw),
            headers={name: headers[name] for name in KEPT_HEADERS if name in headers},
            signature_scheme=scheme.value,
            received_at=received_at,
            verified_at=dt.datetime.now(dt.UTC),
        )
    )
    # Asked before publishing: once the broker has this copy, the webhooks service may
    # store it at any moment, and this very copy would then be reported as stored before.
    # Only `true` is certain; the webhooks service deduplicates every copy either way.
    already_stored = await webhooks_store.is_stored(db, event.id)
    try:
        await publish(envelope)
    except PublishError as exc:
        raise service_unavailable(
            "broker_unavailable", "The webhook was not accepted; send it again."
        ) from exc
    WEBHOOKS_RECEIVED.labels(scheme=scheme.value).inc()
    return {
        "received": True,
        "verified": True,
        "scheme": scheme.value,
        "event_id": str(event.id),
        "already_stored": already_stored,
    }


def parse_event_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(
            400, "invalid_event_id", "An event id is the UUID POST /api/webhooks returned."
        ) from None


async def get_event(db: Database, event_id: uuid.UUID) -> dict[str, Any]:
    async def read(conn: Connection) -> tuple[Record | None, PaymentStatus | None]:
        row = await webhooks_store.event(conn, event_id)
        if row is None or row["payment_id"] is None:
            return row, None
        return row, await status_of(conn, row["payment_id"])

    row, payment_status = await db.transaction(read)
    if row is None:
        raise ApiError(
            404,
            "event_not_found",
            f"No event {event_id}. One received a moment ago may take a second to appear.",
        )
    return {
        "event_id": str(row["id"]),
        "provider": row["provider"],
        "provider_event_id": row["provider_event_id"],
        "event_type": row["event_type"],
        "payment_id": row["claimed_payment_id"],
        "signature_scheme": row["signature_scheme"],
        "status": row["status"],
        "error": row["error"],
        "attempts": row["attempts"],
        "duplicates": row["duplicates"],
        "received_at": row["received_at"].isoformat(),
        "processed_at": row["processed_at"].isoformat() if row["processed_at"] else None,
        "payment": (
            {"id": str(row["payment_id"]), "status": payment_status} if row["payment_id"] else None
        ),
        "body": bytes(row["raw_body"]).decode("utf-8", errors="replace"),
    }
