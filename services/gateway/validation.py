"""Turning a decoded request body into a valid payment order, or into a clear 422.

The body arrives decoded by libs.common.json_body, numbers as Decimal (never float), so
`100.00` is exactly one hundred.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from libs.common.errors import ApiError
from libs.common.money import MoneyError, minor_unit_exponent, to_minor_units

MAX_BODY_BYTES = 64 * 1024
MAX_METADATA_KEYS = 20
MAX_METADATA_KEY_LENGTH = 40
MAX_METADATA_VALUE_LENGTH = 500


def known_currency(value: str) -> str:
    """`value`, if it is a currency whose minor units we know; else a validation error."""
    try:
        minor_unit_exponent(value)
    except MoneyError as exc:
        raise PydanticCustomError(exc.code, exc.message) from None
    return value


def _amount(value: object) -> Decimal:
    # Decimal from a JSON number, or a decimal string; never a boolean.
    if isinstance(value, Decimal):
        return value
    if isinstance(value, str):
        try:
            parsed = Decimal(value.strip())
        except ArithmeticError:
            parsed = Decimal("NaN")
        if value.strip() and parsed.is_finite():
            return parsed
    raise PydanticCustomError(
        "invalid_amount", "amount must be a number or a decimal string, like 100.00"
    )


class PaymentOrder(BaseModel):
    """A valid `POST /api/payments/pay` body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: Decimal
    currency: StrictStr = "USD"
    customer_id: StrictStr
    description: StrictStr | None = None
    metadata: dict[StrictStr, StrictStr] = Field(default_factory=dict)

    # Derived from amount and currency once both are validated.
    _amount_minor: int = PrivateAttr()

    @property
    def amount_minor(self) -> int:
        return self._amount_minor

    @field_validator("amount", mode="before")
    @classmethod
    def _parse_amount(cls, value: object) -> Decimal:
        return _amount(value)

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        return known_currency(value)

    @field_validator("customer_id")
    @classmethod
    def _customer(cls, value: str) -> str:
        if not 1 <= len(value) <= 128 or not value.isprintable() or value != value.strip():
            raise PydanticCustomError(
                "invalid_customer_id",
                "customer_id must be 1 to 128 printable characters without surrounding spaces",
            )
        return value

    @field_validator("description")
    @classmethod
    def _description(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 500 or not value.isprintable()):
            raise PydanticCustomError(
                "invalid_description", "description must be at most 500 printable characters"
            )
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        too_long = any(
            not 1 <= len(k) <= MAX_METADATA_KEY_LENGTH or len(v) > MAX_METADATA_VALUE_LENGTH
            for k, v in value.items()
        )
        if len(value) > MAX_METADATA_KEYS or too_long:
            raise PydanticCustomError(
                "invalid_metadata",
                f"metadata holds at most {MAX_METADATA_KEYS} keys of 1 to"
                f" {MAX_METADATA_KEY_LENGTH} characters with string values of at most"
                f" {MAX_METADATA_VALUE_LENGTH}",
            )
        return value

    @model_validator(mode="after")
    def _in_minor_units(self) -> PaymentOrder:
        try:
            minor = to_minor_units(self.amount, self.currency)
        except MoneyError as exc:
            raise PydanticCustomError(exc.code, exc.message) from None
        self._amount_minor = minor
        return self

    def fingerprint(self) -> str:
        """Equal for two requests that ask for the same payment (the idempotency check)."""
        canonical = json.dumps(
            {
                "amount_minor": self.amount_minor,
                "currency": self.currency,
                "customer_id": self.customer_id,
                "description": self.description,
                "metadata": self.metadata,
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _sentence(field: str, message: str) -> str:
    # "amount: amount must be ..." reads badly; say the field once.
    text = message if message.startswith(field) else f"{field}: {message}"
    return text[0].upper() + text[1:] + "."


_GENERIC_CODES = {"extra_forbidden": "unknown_field", "missing": "missing_field"}


def parse_payment_order(body: dict[str, Any]) -> PaymentOrder:
    try:
        return PaymentOrder.model_validate(body)
    except ValidationError as exc:
        details = []
        for error in exc.errors(include_url=False, include_input=False):
            kind = error["type"]
            code = _GENERIC_CODES.get(kind) or (
                kind if kind.startswith(("invalid_", "amount_")) else None
            )
            loc = error["loc"] or (("amount",) if code and "amount" in code else ())
            field = ".".join(str(part) for part in loc) or "body"
            if code is None:
                code = f"invalid_{loc[0]}" if loc else "invalid_body"
            message = error["msg"].rstrip(".")
            if code == "unknown_field":
                message = "not a field of a payment request"
            elif code == "missing_field":
                message = "required"
            details.append({"field": field, "code": code, "message": message})
        first = details[0]
        raise ApiError(
            422, first["code"], _sentence(first["field"], first["message"]), details=details
        ) from None
