"""Reading JSON from bytes someone else sent: one set of limits, one error.

Every HTTP body and every webhook event goes through `parse_object` (or, for a body
validated by pydantic's own JSON parser, through `check_json`), so each is refused the
same way, with a `JsonError` whose code and message the caller answers with:

- `invalid_encoding`: the bytes are not UTF-8;
- `too_deeply_nested`: arrays and objects nest deeper than `MAX_DEPTH`. The depth is
  measured on the bytes, without recursion, before any decoder sees them: the standard
  library's decoder and the validators after it recurse once per level, and a body a few
  hundred levels deep would otherwise end in a RecursionError (a 500) instead of a 4xx;
- `invalid_json`: not JSON, a duplicate key, NaN or Infinity;
- `invalid_body`: JSON, but not an object.

Numbers are parsed as Decimal, never float or int: `100.00` stays exactly one hundred,
and a number with thousands of digits is a value to refuse, not a ValueError from int().
The size limit is the caller's (`libs.common.web.read_body`), as it differs per route.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from decimal import Decimal
from typing import Any

# Deeper than any real request or provider event (those nest a handful of levels), and
# far below the interpreter's recursion limit that the decoder and validators run into.
MAX_DEPTH = 32


class JsonError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# A string literal, or the rest of the input after an unterminated one: the match never
# fails once it starts, so no input makes the scan backtrack over what it has read.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# +1 for an opening bracket, -1 for a closing one, indexed by byte.
_STEP = [0] * 256
for _byte in b"[{":
    _STEP[_byte] = 1
for _byte in b"]}":
    _STEP[_byte] = -1


def nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in `raw`, counted outside string literals.

    Exact for valid JSON; for invalid JSON never less than what a decoder reaches
    before it stops at the first error."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def check_json(raw: bytes, *, max_depth: int = MAX_DEPTH) -> str:
    """`raw` as text, once it is UTF-8 and nests at most `max_depth` deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonError("invalid_encoding", "The body must be UTF-8 encoded JSON.") from None
    if nesting_depth(raw) > max_depth:
        raise JsonError(
            "too_deeply_nested",
            f"The body nests arrays and objects more than {max_depth} levels deep.",
        )
    return text


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _exact_number(text: str) -> Decimal:
    try:
        return Decimal(text)
    except ArithmeticError:  # an exponent past what Decimal holds, as in 1e99999999999999999999
        raise ValueError(f"the number {text[:40]} is out of range") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


# Built once: json.loads with options builds a new decoder on every call.
_STRICT = json.JSONDecoder(
    parse_float=_exact_number,
    parse_int=_exact_number,
    parse_constant=_refuse_constant,
    object_pairs_hook=_unique_keys,
)
_LENIENT = json.JSONDecoder(parse_float=_exact_number, parse_int=_exact_number)


@dataclasses.dataclass(frozen=True, slots=True)
class JsonObject:
    value: dict[str, Any]
    # Only a lenient parse accepts bytes after the object (see `parse_object`).
    trailing_bytes: bool = False


def parse_object(raw: bytes, *, lenient: bool = False, max_depth: int = MAX_DEPTH) -> JsonObject:
    """Decode a JSON object from `raw`, or raise JsonError.

    Strict (a client's request): a duplicate key, NaN, Infinity or anything after the
    object is refused. Lenient (a provider's event, kept as it was signed): a duplicate
    key keeps its last value, NaN and Infinity are numbers, and what follows the object
    is ignored, as the seed's documented `payload.json` ends in a stray `1`."""
    text = check_json(raw, max_depth=max_depth)
    try:
        if lenient:
            stripped = text.lstrip()
            value, end = _LENIENT.raw_decode(stripped)
            trailing = bool(stripped[end:].strip())
        else:
            value, trailing = _STRICT.decode(text), False
    except ValueError as exc:
        raise JsonError("invalid_json", f"The body is not valid JSON: {exc}.") from None
    if not isinstance(value, dict):
        raise JsonError("invalid_body", "The body must be a JSON object.")
    return JsonObject(value, trailing)
