"""Webhook signatures: the seed's scheme and Standard Webhooks, signing and verifying.

Both are HMAC-SHA256 over the exact bytes of the request body, so they are computed and
checked on raw bytes before anything parses them.

- seed: `X-Webhook-Signature: <hex HMAC-SHA256(secret, body)>` (a `sha256=` prefix is
  accepted too), the key being the secret's UTF-8 bytes as written, a `whsec_` one
  included. What `openssl dgst -sha256 -hmac "$WEBHOOK_SECRET" payload.json` prints.
- Standard Webhooks (standardwebhooks.com): `webhook-id`, `webhook-timestamp` (Unix
  seconds) and `webhook-signature: v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`,
  several space-separated signatures allowed. A secret written `whsec_<base64>` is used
  as the decoded key, as the spec and its official libraries read it; any other secret as
  its UTF-8 bytes (see `standard_key`).

With several secrets (rotation), the first one signs and every one verifies.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

SEED_HEADER = "X-Webhook-Signature"
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
TOLERANCE_SECONDS = 300


class Scheme(enum.StrEnum):
    SEED = "seed"
    STANDARD = "standard"


class SignatureError(Exception):
    """Why a request's signature was refused; `code` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _same(given: str, expected: str) -> bool:
    # Bytes, because compare_digest refuses non-ASCII str (and headers can carry anything).
    return hmac.compare_digest(given.encode(), expected.encode())


STANDARD_SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret


def standard_key(secret: str) -> bytes:
    """The HMAC key Standard Webhooks signs with, from a configured secret.

    `whsec_<base64>` is the spec's form (what the official libraries generate and read):
    the key is the decoded bytes, with or without the base64 padding, as those libraries
    accept it. Any other secret, such as the seed's `webhook-secret-key`, is used as its
    UTF-8 bytes (with the official libraries, pass those bytes: `Webhook(secret.encode())`).
    Raises ValueError for a `whsec_` secret that is not base64.
    """
    if not secret.startswith(STANDARD_SECRET_PREFIX):
        return secret.encode()
    encoded = secret.removeprefix(STANDARD_SECRET_PREFIX).rstrip("=")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "a secret starting with whsec_ must continue in base64 (A-Z a-z 0-9 + /),"
            " as the Standard Webhooks libraries generate it"
        ) from None
    if not key:
        raise ValueError("a whsec_ secret must hold a key after the prefix")
    return key


def seed_signature(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def standard_signature(message_id: str, timestamp: int, body: bytes, secret: str) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(standard_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    body: bytes, secrets: Sequence[str], *, message_id: str, timestamp: int | None = None
) -> dict[str, str]:
    """Headers that sign `body` under both schemes with the first secret."""
    secret = secrets[0]
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        SEED_HEADER: seed_signature(body, secret),
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: standard_signature(message_id, timestamp, body, secret),
    }


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str],
    *,
    now: float | None = None,
    tolerance: int = TOLERANCE_SECONDS,
) -> Scheme:
    """Return the scheme that verified `body`, or raise SignatureError.

    Standard Webhooks wins when its headers are present, since it also proves freshness.
    `headers` must look names up case-insensitively (aiohttp's and multidict's do).
    """
    if SIGNATURE_HEADER in headers or ID_HEADER in headers or TIMESTAMP_HEADER in headers:
        _verify_standard(body, headers, secrets, now=now, tolerance=tolerance)
        return Scheme.STANDARD
    if SEED_HEADER in headers:
        _verify_seed(body, headers[SEED_HEADER], secrets)
        return Scheme.SEED
    raise SignatureError(
        "signature_missing",
        f"Sign the raw body: send {SEED_HEADER} or the Standard Webhooks headers.",
    )


def _verify_seed(body: bytes, header: str, secrets: Sequence[str]) -> None:
    given = header.strip().removeprefix("sha256=").lower()
    # Compare every candidate, whatever matches first, so timing says nothing about which.
    matches = [_same(given, seed_signature(body, s)) for s in secrets]
    if not any(matches):
        raise SignatureError(
            "signature_invalid",
            f"{SEED_HEADER} does not match the body. Sign the exact bytes you send"
            " (curl --data-binary, not -d).",
        )


def _verify_standard(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str],
    *,
    now: float | None,
    tolerance: int,
) -> None:
    message_id = headers.get(ID_HEADER, "")
    raw_timestamp = headers.get(TIMESTAMP_HEADER, "")
    signatures = headers.get(SIGNATURE_HEADER, "")
    if not (message_id and raw_timestamp and signatures):
        raise SignatureError(
            "signature_missing",
            f"Standard Webhooks needs all of {ID_HEADER}, {TIMESTAMP_HEADER}"
            f" and {SIGNATURE_HEADER}.",
        )
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise SignatureError(
            "signature_timestamp_invalid", f"{TIMESTAMP_HEADER} must be Unix seconds."
        ) from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(
            "signature_timestamp_out_of_tolerance",
            f"{TIMESTAMP_HEADER} is more than {tolerance} s away from the server's clock.",
        )
    expected = [standard_signature(message_id, timestamp, body, s) for s in secrets]
    given = [part for part in signatures.split(" ") if part.startswith("v1,")]
    matches = [_same(g, e) for g in given for e in expected]
    if not any(matches):
        raise SignatureError(
            "signature_invalid", f"No signature in {SIGNATURE_HEADER} matches the body."
        )
