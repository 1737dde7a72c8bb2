"""Checks responses against the gateway's OpenAPI document (services/gateway/openapi.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT_PATH = Path(__file__).resolve().parents[1] / "services" / "gateway" / "openapi.json"
DOCUMENT: dict[str, Any] = json.loads(DOCUMENT_PATH.read_text())
_URI = "urn:gateway-openapi"
_REGISTRY: Registry[Any] = Registry().with_resource(
    _URI, Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$")


# Literal paths first, so /api/payments/stats is not taken for /api/payments/{payment_id}.
_TEMPLATES = sorted(DOCUMENT["paths"], key=lambda t: ("{" in t, t))


def route_of(path: str) -> str:
    path = path.split("?", 1)[0]
    for template in _TEMPLATES:
        if _pattern(template).match(path):
            return template
    raise AssertionError(f"{path} is not in the OpenAPI document")


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def assert_conforms(method: str, path: str, status: int, content_type: str, body: Any) -> None:
    """Fail unless the document declares this status for this operation and the body fits."""
    template = route_of(path)
    operation = DOCUMENT["paths"][template].get(method.lower())
    assert operation is not None, f"{method} {template} is not documented"
    responses = operation["responses"]
    assert str(status) in responses, f"{method} {template} may not answer {status}: {body!r}"
    content = responses[str(status)].get("content", {})
    if not content:
        return
    assert content_type in content, f"{method} {template} {status} is not {content_type}"
    pointer = "/".join(
        [
            "#",
            "paths",
            _escape(template),
            method.lower(),
            "responses",
            str(status),
            "content",
            _escape(content_type),
            "schema",
        ]
    )
    validator = Draft202012Validator({"$ref": _URI + pointer}, registry=_REGISTRY)
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{method} {path} {status}: " + "; ".join(e.message for e in errors)
