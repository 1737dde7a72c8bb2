"""libs.common.json_body: the depth measured on bytes, the strict and lenient parses."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.common.json_body import MAX_DEPTH, JsonError, nesting_depth, parse_object
from libs.common.money import MoneyError, to_minor_units


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


# Strings full of brackets, quotes and backslashes: what a scan that loses track of string
# literals would count.
_tricky_text = st.text(alphabet='[]{}"\\ ,:ab\n\u00e9\U0001f600', max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _tricky_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_tricky_text, children, max_size=4)
    ),
    max_leaves=40,
)


@given(value=json_values, ascii_only=st.booleans())
def test_depth_on_the_bytes_is_the_depth_of_the_value(value: Any, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nesting_depth(raw) == depth_of(value)


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"", 0),
        (b"1", 0),
        (b"{}", 1),
        (b'{"a": [[{"b": "[[[[[["}]]]}', 4),
        (b'["\\"[[[", [[]]]', 3),
        (b'["\\\\", [[]]]', 3),
        # An unterminated string: what follows it is part of it, as for any decoder.
        (b'["abc [[[[', 1),
    ],
)
def test_depth_examples(raw: bytes, depth: int) -> None:
    assert nesting_depth(raw) == depth


def test_depth_scan_is_linear_on_hostile_quotes_and_brackets() -> None:
    # Each of these would make a backtracking or recursive scan quadratic or crash.
    for raw in (b'"\\"' * 100_000, b"[" * 300_000, b'["' * 100_000, b"\\" * 300_000):
        nesting_depth(raw)


@pytest.mark.parametrize("lenient", [False, True])
@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"k": ' + b"[" * 1000 + b"]" * 1000 + b"}", "too_deeply_nested"),
        (b"[" * 100_000, "too_deeply_nested"),
        (b'{"a": "\xff"}', "invalid_encoding"),
        (b"{", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1]", "invalid_body"),
        (b"null", "invalid_body"),
        (b'"text"', "invalid_body"),
        # Past the largest exponent Decimal holds: InvalidOperation, a 500, before.
        (b'{"amount": 1E+99999999999999999999}', "invalid_json"),
    ],
)
def test_refusals(raw: bytes, code: str, lenient: bool) -> None:
    with pytest.raises(JsonError) as refused:
        parse_object(raw, lenient=lenient)
    assert refused.value.code == code
    assert refused.value.message


def test_the_limit_itself_is_allowed() -> None:
    at_limit = b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
    assert parse_object(b'{"k": ' + at_limit + b"}").value["k"] is not None
    with pytest.raises(JsonError):
        parse_object(b'{"k": [' + at_limit + b"]}")


@pytest.mark.parametrize(
    "raw", [b'{"a": 1, "a": 2}', b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1} 1']
)
def test_strict_refuses_what_lenient_reads(raw: bytes) -> None:
    with pytest.raises(JsonError) as refused:
        parse_object(raw)
    assert refused.value.code == "invalid_json"
    assert parse_object(raw, lenient=True).value["a"] is not None


def test_numbers_are_exact_and_never_int_or_float() -> None:
    huge = b"9" * 5000
    parsed = parse_object(b'{"n": ' + huge + b', "x": 0.1, "e": 1e999999999}').value
    assert parsed == {"n": Decimal(huge.decode()), "x": Decimal("0.1"), "e": Decimal("1e999999999")}
    lenient = parse_object(b'  {"n": ' + huge + b"}\n1\n", lenient=True)
    assert lenient.value == {"n": Decimal(huge.decode())}
    assert lenient.trailing_bytes


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        # Decimal arithmetic rounds this to 28 digits: it used to pass for 10.00.
        ("10.0000000000000000000000000000001", "amount_too_precise"),
        # Decimal arithmetic underflows this to zero minor units.
        ("1e-999999999", "amount_too_precise"),
        # ... and overflows on this (decimal.Overflow, a 500).
        ("1e999999999", "amount_too_large"),
        ("9" * 60_000, "amount_too_large"),
    ],
)
def test_amounts_far_out_of_range_are_refused_exactly(amount: str, code: str) -> None:
    with pytest.raises(MoneyError) as refused:
        to_minor_units(Decimal(amount), "USD")
    assert refused.value.code == code


@given(
    minor=st.integers(1, 99_999_999_999),
    exponent=st.sampled_from([0, 2, 3]),
    zeros=st.integers(0, 40),
)
def test_minor_units_are_exact_however_the_amount_is_spelled(
    minor: int, exponent: int, zeros: int
) -> None:
    currency = {0: "JPY", 2: "USD", 3: "BHD"}[exponent]
    whole, fraction = divmod(minor, 10**exponent)
    spelled = f"{whole}.{fraction:0{exponent}d}{'0' * zeros}" if exponent or zeros else str(whole)
    assert to_minor_units(Decimal(spelled), currency) == minor
    assert to_minor_units(Decimal(f"{minor}{'0' * zeros}e-{exponent + zeros}"), currency) == minor


def test_readme_and_openapi_state_the_depth_limit() -> None:
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    openapi = (root / "services" / "gateway" / "openapi.json").read_text()
    assert readme.count(f"{MAX_DEPTH} levels") >= 3
    assert openapi.count(f"{MAX_DEPTH} levels") == 2
