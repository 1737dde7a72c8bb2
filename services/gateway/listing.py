"""What every list route shares: its query's refusals and its opaque cursor.

A cursor is the position of the last row shown, `(created_at, key)`, as base64 JSON. It
comes back from the client, so it is read like a body (size and depth checked first) and
anything that is not a cursor this gateway wrote is one refusal, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

from libs.common.errors import ApiError
from libs.common.json_body import check_json

K = TypeVar("K")


def query_refused(exc: ValidationError) -> ApiError:
    """A list query pydantic refused: 400, one entry per bad parameter."""
    details = [
        {
            "field": ".".join(str(p) for p in e["loc"]),
            "code": "unknown_parameter" if e["type"] == "extra_forbidden" else "invalid_value",
            "message": e["msg"],
        }
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0]
    return ApiError(
        400,
        first["code"] if first["code"] == "unknown_parameter" else "invalid_query",
        f"{first['field']}: {first['message']}.",
        details=details,
    )


def encode_cursor(created_at: dt.datetime, key: object) -> str:
    raw = json.dumps([created_at.isoformat(), key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, key: Callable[[object], K]) -> tuple[dt.datetime, K]:
    """The position in `cursor`; `key` turns its second half back into the row's key and
    raises ValueError or TypeError for one that is not."""
    invalid = ApiError(400, "invalid_cursor", "cursor must be a next_cursor from an earlier page.")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, raw_key = json.loads(check_json(raw))
        position = dt.datetime.fromisoformat(created_at), key(raw_key)
    except (ValueError, TypeError, binascii.Error):
        raise invalid from None
    if position[0].tzinfo is None:
        raise invalid
    return position
