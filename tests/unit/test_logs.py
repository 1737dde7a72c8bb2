"""Log lines are JSON objects carrying the service and the correlation id."""

from __future__ import annotations

import json
import logging

import pytest

from libs.common.logs import configure_logging, correlation_scope, get_correlation_id


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_lines_are_json_with_correlation_id(
    capsys: pytest.CaptureFixture[str], restore_logging: object
) -> None:
    configure_logging("payments")
    log = logging.getLogger("payments.test")
    with correlation_scope("abc123"):
        log.info("payment stored", extra={"payment_id": "p1"})
    log.info("outside any request")
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["message"] == "payment stored"
    assert first["service"] == "payments"
    assert first["correlation_id"] == "abc123"
    assert first["payment_id"] == "p1"
    assert first["level"] == "INFO"
    assert second["correlation_id"] is None


def test_scopes_nest_and_restore() -> None:
    with correlation_scope("outer"):
        with correlation_scope(None) as inner:
            assert get_correlation_id() == inner != "outer"
        assert get_correlation_id() == "outer"
    assert get_correlation_id() is None
