"""Exact money: integer minor units inside, decimal strings at the edges, ISO 4217 currencies.

Amounts never pass through a float. The API parses JSON numbers as Decimal, checks that
the value is exactly representable in the currency's minor unit (USD cents, JPY whole
yen, BHD fils), and stores the integer count of minor units.
"""

from __future__ import annotations

from decimal import Decimal

from iso4217 import Currency

# The largest amount one payment may carry, in minor units (999,999,999.99 in a
# two-decimal currency): far above any bill, far below BIGINT.
MAX_AMOUNT_MINOR = 99_999_999_999


class MoneyError(ValueError):
    """An amount or currency the platform refuses; `code` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def minor_unit_exponent(code: str) -> int:
    """Decimal places of `code`'s minor unit; refuses unknown codes and non-money (XAU, XXX)."""
    try:
        exponent = Currency(code).exponent
    except ValueError:
        raise MoneyError(
            "invalid_currency", f"{code!r} is not an ISO 4217 currency code."
        ) from None
    if exponent is None:
        raise MoneyError("invalid_currency", f"{code} is not a currency payments can be made in.")
    return exponent


def to_minor_units(amount: Decimal, currency: str) -> int:
    """`amount` as an exact count of `currency`'s minor units, or MoneyError.

    Computed from the amount's digits and exponent, never through Decimal arithmetic:
    that rounds to the context's 28 digits (10.000…0001 would pass for 10.00) and
    overflows or underflows on exponents such as 1e999999999 or 1e-999999999."""
    exponent = minor_unit_exponent(currency)
    if not amount.is_finite():
        raise MoneyError("invalid_amount", "amount must be a finite number.")
    if amount <= 0:
        raise MoneyError("invalid_amount", "amount must be greater than zero.")
    _, digits, power = amount.as_tuple()
    power = int(power)  # an int for a finite Decimal ("n", "N", "F" only otherwise)
    significant = "".join(map(str, digits)).rstrip("0")
    # amount = int(significant) * 10**shift minor units.
    shift = power + exponent + (len(digits) - len(significant))
    if shift < 0:
        allowed = f"at most {exponent} decimal places" if exponent else "no decimal places"
        raise MoneyError("amount_too_precise", f"{currency} amounts have {allowed}.")
    # Compared by length first, so an amount with thousands of digits is never an int.
    too_large = len(significant) + shift > len(str(MAX_AMOUNT_MINOR))
    minor = 0 if too_large else int(significant) * 10**shift
    if too_large or minor > MAX_AMOUNT_MINOR:
        raise MoneyError(
            "amount_too_large",
            f"amount must be at most {format_minor_units(MAX_AMOUNT_MINOR, currency)}.",
        )
    return minor


def format_minor_units(amount_minor: int, currency: str) -> str:
    """`10000, "USD"` → `"100.00"`; `500, "JPY"` → `"500"`."""
    exponent = minor_unit_exponent(currency)
    return f"{Decimal(amount_minor).scaleb(-exponent):.{exponent}f}"
