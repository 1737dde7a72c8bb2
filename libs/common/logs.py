"""JSON logs, one object per line, each carrying the correlation id of the work it belongs to.

The correlation id lives in a contextvar: the HTTP middleware sets it from the request,
the consumer sets it from the message envelope, and every log line (and every message
published) under that context picks it up without being passed around.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator

from pythonjsonlogger.json import JsonFormatter

# The HTTP header that carries it between services (and back from the provider).
CORRELATION_HEADER = "X-Correlation-ID"

_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "correlation_id", default=None
)


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def get_correlation_id() -> str | None:
    return _correlation_id.get()


@contextlib.contextmanager
def correlation_scope(correlation_id: str | None) -> Iterator[str]:
    """Run a block under `correlation_id` (a fresh one when None)."""
    value = correlation_id or new_correlation_id()
    token = _correlation_id.set(value)
    try:
        yield value
    finally:
        _correlation_id.reset(token)


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.correlation_id = _correlation_id.get()
        return True


# The logger of the one-line-per-request access log; its records carry their fields in
# `record.access` (a dict), which `_AccessFormatter` writes as they are.
ACCESS_LOGGER = "access"


class _AccessFormatter(logging.Formatter):
    """The same JSON object as every other line, for a line written per request: the
    general formatter inspects every attribute of each record and formats its time anew,
    which cost more than half of an access line; this one knows its fields."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        fields: dict[str, object] = getattr(record, "access", {})
        return json.dumps(
            {
                "time": self._stamp,
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                "service": getattr(record, "service", None),
                "correlation_id": getattr(record, "correlation_id", None),
                **fields,
            },
            default=str,
        )


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every logger's records to stdout as JSON. Idempotent."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_ContextFilter(service))
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(service)s %(correlation_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access_handler = logging.StreamHandler(sys.stdout)
    access_handler.addFilter(_ContextFilter(service))
    access_handler.setFormatter(_AccessFormatter())
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [access_handler]
    access.propagate = False
    # aio-pika/aiormq log every reconnect attempt at ERROR with a traceback; one line is enough.
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
