"""The provider's HTTP API: decode the request, call services.provider.charges, encode.

A simulated outage (PROVIDER_ERROR_RATE) is decided before anything else, so a 503 never
leaves state behind, as with a real PSP whose load balancer refused the call.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from libs.common.errors import ApiError, service_unavailable
from libs.common.web import DATABASE, read_checked_json
from services.provider.charges import (
    Charge,
    ChargeRequest,
    ChargeStatus,
    IdempotencyKeyReused,
    create_charge,
    get_charge,
    list_charges,
)
from services.provider.keys import SIMULATION, WAKEUPS
from services.provider.refunds import (
    Refund,
    RefundRefused,
    RefundRequest,
    create_refund,
    find_refunds,
    get_refund,
)

M = TypeVar("M", bound=BaseModel)

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x20-\x7e]{1,255}$")
# A charge request is a few hundred bytes.
# A charge or refund request is a handful of fields; nothing legitimate comes near this.
MAX_REQUEST_BYTES = 64 * 1024


def add_routes(app: web.Application) -> None:
    app.router.add_post("/charges", create)
    app.router.add_get("/charges", list_for_payment)
    app.router.add_get("/charges/{charge_id}", get_one)
    app.router.add_post("/refunds", create_refund_route)
    app.router.add_get("/refunds", list_refunds)
    app.router.add_get("/refunds/{refund_id}", get_refund_route)


def charge_json(charge: Charge) -> dict[str, Any]:
    return {
        "id": charge.id,
        "payment_id": str(charge.payment_id),
        "reference": charge.reference,
        "amount_minor": charge.amount_minor,
        "currency": charge.currency,
        "customer_id": charge.customer_id,
        "status": charge.status.value,
        "decline_reason": charge.decline_reason,
        "created_at": charge.created_at.isoformat(),
        "settled_at": None if charge.settled_at is None else charge.settled_at.isoformat(),
    }


def _refuse_if_unavailable(request: web.Request) -> None:
    if request.app[SIMULATION].unavailable():
        raise service_unavailable(
            "provider_unavailable",
            "The provider is temporarily unavailable (simulated); retry with the same"
            f" {IDEMPOTENCY_HEADER}.",
        )


def _idempotency_key(request: web.Request) -> str:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        raise ApiError(
            400, "idempotency_key_missing", f"Send an {IDEMPOTENCY_HEADER} header with each charge."
        )
    if not _IDEMPOTENCY_KEY_RE.match(key):
        raise ApiError(
            400,
            "idempotency_key_invalid",
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters.",
        )
    return key


def _charge_request(body: bytes) -> ChargeRequest:
    return _validated(ChargeRequest, body, "charge")


def _validated(model: type[M], body: bytes, what: str) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if any(error["type"] == "json_invalid" for error in errors):
            raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
        details = [
            {
                "field": ".".join(str(part) for part in error["loc"]) or "body",
                "code": error["type"],
                "message": error["msg"],
            }
            for error in errors
        ]
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        raise ApiError(
            400, "validation_error", f"The {what} is not valid: {summary}.", details=details
        ) from None


async def create(request: web.Request) -> web.Response:
    _refuse_if_unavailable(request)
    key = _idempotency_key(request)
    charge_request = _charge_request(await read_checked_json(request, MAX_REQUEST_BYTES))
    try:
        result = await create_charge(
            request.app[DATABASE], request.app[SIMULATION], key, charge_request
        )
    except IdempotencyKeyReused:
        raise _key_reused() from None
    if not result.replayed:
        if result.charge.status is ChargeStatus.PROCESSING:
            request.app[WAKEUPS].settle_after(request.app[SIMULATION].settle_delay_ms / 1000)
        else:  # declined at once, its webhook queued with it
            request.app[WAKEUPS].deliver_now()
    return _created(charge_json(result.charge), f"/charges/{result.charge.id}", result.replayed)


def _key_reused() -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        f"This {IDEMPOTENCY_HEADER} was already used with a different request body.",
    )


def _created(body: dict[str, Any], location: str, replayed: bool) -> web.Response:
    """201 with its Location the first time; 200 marked as replayed for the same key again."""
    if replayed:
        return web.json_response(body, status=200, headers={REPLAYED_HEADER: "true"})
    return web.json_response(body, status=201, headers={"Location": location})


async def get_one(request: web.Request) -> web.Response:
    _refuse_if_unavailable(request)
    charge_id = request.match_info["charge_id"]
    charge = await get_charge(request.app[DATABASE], charge_id)
    if charge is None:
        raise ApiError(404, "charge_not_found", f"There is no charge {charge_id}.")
    return web.json_response(charge_json(charge))


async def list_for_payment(request: web.Request) -> web.Response:
    _refuse_if_unavailable(request)
    raw = request.query.get("payment_id")
    try:
        payment_id = uuid.UUID(raw) if raw else None
    except ValueError:
        payment_id = None
    if payment_id is None:
        raise ApiError(
            400,
            "validation_error",
            "Give the payment to look up as a UUID: ?payment_id=<uuid>.",
            details=[{"field": "payment_id", "code": "uuid_parsing", "message": "must be a UUID"}],
        )
    charges = await list_charges(request.app[DATABASE], payment_id)
    return web.json_response({"data": [charge_json(charge) for charge in charges]})


# --- refunds ----------------------------------------------------------------------------------


def refund_json(refund: Refund) -> dict[str, Any]:
    return {
        "id": refund.id,
        "charge_id": refund.charge_id,
        "payment_id": refund.payment_id,
        "reference": refund.reference,
        "amount_minor": refund.amount_minor,
        "currency": refund.currency,
        "status": refund.status.value,
        "failure_reason": refund.failure_reason,
        "created_at": refund.created_at.isoformat(),
        "settled_at": None if refund.settled_at is None else refund.settled_at.isoformat(),
    }


async def create_refund_route(request: web.Request) -> web.Response:
    _refuse_if_unavailable(request)
    key = _idempotency_key(request)
    body = await read_checked_json(request, MAX_REQUEST_BYTES)
    refund_request = _validated(RefundRequest, body, "refund")
    try:
        result = await create_refund(
            request.app[DATABASE], request.app[SIMULATION], key, refund_request
        )
    except IdempotencyKeyReused:
        raise _key_reused() from None
    except RefundRefused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    if not result.replayed:
        request.app[WAKEUPS].settle_after(request.app[SIMULATION].settle_delay_ms / 1000)
    return _created(refund_json(result.refund), f"/refunds/{result.refund.id}", result.replayed)


async def get_refund_route(request: web.Request) -> web.Response:
    _refuse_if_unavailable(request)
    refund_id = request.match_info["refund_id"]
    refund = await get_refund(request.app[DATABASE], refund_id)
    if refund is None:
        raise ApiError(404, "refund_not_found", f"There is no refund {refund_id}.")
    return web.json_response(refund_json(refund))


async def list_refunds(request: web.Request) -> web.Response:
    """Refunds by the merchant's reference (?reference=) and/or of a charge (?charge_id=)."""
    _refuse_if_unavailable(request)
    reference = request.query.get("reference") or None
    charge_id = request.query.get("charge_id") or None
    if reference is None and charge_id is None:
        raise ApiError(
            400,
            "validation_error",
            "Say which refunds: ?reference=<your refund id> and/or ?charge_id=<charge id>.",
        )
    refunds = await find_refunds(request.app[DATABASE], reference=reference, charge_id=charge_id)
    return web.json_response({"data": [refund_json(refund) for refund in refunds]})
