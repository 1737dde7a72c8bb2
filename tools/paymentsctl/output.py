"""What the commands print: readable tables and lines, or the raw JSON with --json.

The renderers are pure functions from the API's JSON (or a parked message) to text, so
they are tested without a server. They read fields with `.get`, so an answer with a
field missing prints `-` instead of failing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from libs.common.broker.parking import ParkedMessage

MISSING = "-"
ERROR_WIDTH = 60


class Output:
    """Where a command writes: text for people, or JSON (--json) for scripts."""

    def __init__(self, stream: TextIO, *, as_json: bool) -> None:
        self.stream = stream
        self.as_json = as_json

    def json(self, value: Any) -> None:
        self.stream.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")

    def text(self, text: str) -> None:
        self.stream.write(text if text.endswith("\n") else text + "\n")

    def show(self, value: Any, render: str) -> None:
        """`value` as JSON with --json, else the rendered text."""
        if self.as_json:
            self.json(value)
        else:
            self.text(render)


def cell(value: Any) -> str:
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[int] = ()
) -> str:
    """Columns padded to their widest cell; the columns in `right` aligned right."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(widths[i]) if i in right else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line([h.upper() for h in headers]), *(line(r) for r in cells)])


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """`name: value` lines, the values aligned."""
    width = max(len(name) for name, _ in pairs) + 1
    return "\n".join(f"{name + ':':<{width}} {cell(value)}".rstrip() for name, value in pairs)


def _metadata(value: Any) -> str:
    if isinstance(value, Mapping) and value:
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return MISSING


def _amount(payment: Mapping[str, Any]) -> str:
    return f"{cell(payment.get('amount'))} {cell(payment.get('currency'))}"


# --- payments ---------------------------------------------------------------------------------


def payment_fields(payment: Mapping[str, Any]) -> str:
    pairs: list[tuple[str, Any]] = [
        ("id", payment.get("id")),
        ("reference", payment.get("reference")),
        ("status", payment.get("status")),
        ("amount", _amount(payment)),
        ("customer", payment.get("customer_id")),
        ("description", payment.get("description")),
        ("metadata", _metadata(payment.get("metadata"))),
    ]
    if "provider" in payment:
        pairs += [
            ("provider", payment.get("provider")),
            ("provider reference", payment.get("provider_reference")),
            ("failure reason", payment.get("failure_reason")),
        ]
    pairs.append(("created", payment.get("created_at")))
    if "updated_at" in payment:
        pairs.append(("updated", payment.get("updated_at")))
    return fields(pairs)


def accepted(payment: Mapping[str, Any], *, replayed: bool) -> str:
    head = (
        "accepted (replayed: the first answer to this idempotency key)" if replayed else "accepted"
    )
    return f"{head}\n{payment_fields(payment)}"


def payment_detail(payment: Mapping[str, Any]) -> str:
    events = payment.get("events") or []
    rows = [
        [
            e.get("at"),
            e.get("from_status"),
            e.get("to_status"),
            e.get("applied"),
            e.get("source"),
            e.get("reason"),
        ]
        for e in events
    ]
    trail = table(["at", "from", "to", "applied", "source", "reason"], rows) if rows else "none"
    return f"{payment_fields(payment)}\n\nevents:\n{trail}"


def payment_list(payments: Sequence[Mapping[str, Any]], next_cursor: str | None) -> str:
    rows = [
        [
            p.get("id"),
            p.get("reference"),
            p.get("status"),
            p.get("amount"),
            p.get("currency"),
            p.get("customer_id"),
            p.get("created_at"),
        ]
        for p in payments
    ]
    text = (
        table(
            ["id", "reference", "status", "amount", "currency", "customer", "created"],
            rows,
            right=[3],
        )
        if rows
        else "no payments"
    )
    if next_cursor:
        text += f"\n\nmore: --cursor {next_cursor}  (or --all)"
    return text


# --- events -----------------------------------------------------------------------------------

EVENT_COLUMNS = ["occurred", "type", "payment", "seq", "from", "source", "reason"]


def event_row(event: Mapping[str, Any]) -> list[Any]:
    payload = event.get("payload") or {}
    return [
        event.get("occurred_at"),
        event.get("type"),
        payload.get("payment_id"),
        payload.get("sequence"),
        payload.get("previous_status"),
        payload.get("source"),
        payload.get("reason"),
    ]


def event_list(events: Sequence[Mapping[str, Any]], next_cursor: str | None) -> str:
    rows = [event_row(e) for e in events]
    text = table(EVENT_COLUMNS, rows, right=[3]) if rows else "no events"
    if next_cursor:
        text += f"\n\nmore: --cursor {next_cursor}  (or --all)"
    return text


def event_line(event: Mapping[str, Any]) -> str:
    """One event as it arrives (`events tail`): the list's columns on one line."""
    return "  ".join(cell(value) for value in event_row(event))


# --- refunds ----------------------------------------------------------------------------------


def refund_fields(refund: Mapping[str, Any]) -> str:
    return fields(
        [
            ("id", refund.get("id")),
            ("payment", refund.get("payment_id")),
            ("status", refund.get("status")),
            ("amount", _amount(refund)),
            ("reason", refund.get("reason")),
            ("failure reason", refund.get("failure_reason")),
            ("provider refund", refund.get("provider_refund_id")),
            ("created", refund.get("created_at")),
            ("settled", refund.get("settled_at")),
        ]
    )


def refund_accepted(refund: Mapping[str, Any], *, replayed: bool) -> str:
    head = (
        "refund accepted (replayed: the first answer to this idempotency key)"
        if replayed
        else "refund accepted"
    )
    return f"{head}\n{refund_fields(refund)}"


def refund_list(refunds: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [r.get("id"), r.get("status"), r.get("amount"), r.get("currency"), r.get("created_at")]
        for r in refunds
    ]
    if not rows:
        return "no refunds"
    return table(["id", "status", "amount", "currency", "created"], rows, right=[2])


# --- stats ------------------------------------------------------------------------------------


def _rate(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, int | float) else "n/a (nothing settled)"


def stats(body: Mapping[str, Any]) -> str:
    payments = body.get("payments") or {}
    by_status = payments.get("by_status") or {}
    status_rows = [
        [
            status,
            entry.get("count"),
            ", ".join(f"{a} {c}" for c, a in (entry.get("amounts") or {}).items()),
        ]
        for status, entry in by_status.items()
    ]
    by_currency = payments.get("by_currency") or {}
    currency_rows = [[c, e.get("count"), e.get("amount")] for c, e in by_currency.items()]
    refunded = (body.get("refunds") or {}).get("refunded") or {}
    refund_rows = [[c, e.get("count"), e.get("amount")] for c, e in refunded.items()]
    webhooks = body.get("webhooks") or {}
    webhook_rows = [[s, n] for s, n in (webhooks.get("by_status") or {}).items()]
    last = body.get("last_reconciliation")
    parts = [
        f"payments: {cell(payments.get('total'))}"
        f" (success rate {_rate(payments.get('success_rate'))})",
    ]
    if status_rows:
        parts.append(table(["status", "count", "amounts"], status_rows, right=[1]))
    if currency_rows:
        parts.append(table(["currency", "count", "amount"], currency_rows, right=[1, 2]))
    if refund_rows:
        parts.append(
            "refunded:\n" + table(["currency", "refunds", "amount"], refund_rows, right=[1, 2])
        )
    parts.append(f"webhooks: {cell(webhooks.get('total'))}")
    if webhook_rows:
        parts.append(table(["status", "count"], webhook_rows, right=[1]))
    parts.append(
        "last reconciliation: " + (run_line(last) if isinstance(last, Mapping) else "none yet")
    )
    return "\n\n".join(parts)


# --- webhooks ---------------------------------------------------------------------------------


def header_lines(headers: Mapping[str, str]) -> str:
    return "\n".join(f"{name}: {value}" for name, value in headers.items())


def receipt(body: Mapping[str, Any]) -> str:
    return fields(
        [
            ("received", body.get("received")),
            ("verified", body.get("verified")),
            ("scheme", body.get("scheme")),
            ("event id", body.get("event_id")),
            ("already stored", body.get("already_stored")),
        ]
    )


# --- reconciliation ---------------------------------------------------------------------------


def _duration(ms: Any) -> str:
    return f"{ms / 1000:.2f} s" if isinstance(ms, int | float) else MISSING


def run_line(run: Mapping[str, Any]) -> str:
    return (
        f"{cell(run.get('id'))} {cell(run.get('status'))} ({cell(run.get('trigger'))},"
        f" started {cell(run.get('started_at'))}): checked {cell(run.get('checked'))},"
        f" updated {cell(run.get('updated'))}, errors {cell(run.get('errors'))}"
    )


def run_summary(run: Mapping[str, Any]) -> str:
    summary = fields(
        [
            ("run", run.get("id")),
            ("status", run.get("status")),
            ("trigger", run.get("trigger")),
            ("started", run.get("started_at")),
            ("finished", run.get("finished_at")),
            ("duration", _duration(run.get("duration_ms"))),
            ("checked", run.get("checked")),
            ("updated", run.get("updated")),
            ("unchanged", run.get("unchanged")),
            ("errors", run.get("errors")),
        ]
    )
    changes = run.get("changes") or []
    rows = [
        [c.get("payment_id"), c.get("from_status"), c.get("to_status"), c.get("reason")]
        for c in changes
    ]
    parts = [summary]
    parts.append(
        "changes:\n" + table(["payment", "from", "to", "reason"], rows) if rows else "changes: none"
    )
    problems = run.get("error_details") or []
    if problems:
        parts.append(
            "errors:\n"
            + table(["payment", "error"], [[p.get("payment_id"), p.get("error")] for p in problems])
        )
    return "\n\n".join(parts)


# --- parking queues ---------------------------------------------------------------------------


def parked_json(message: ParkedMessage) -> dict[str, Any]:
    """A parked message as JSON: the body as text when it is UTF-8, else in base64."""
    value: dict[str, Any] = {
        "queue": message.queue,
        "message_id": message.message_id,
        "type": message.type,
        "routing_key": message.routing_key,
        "reason": message.reason,
        "error": message.error,
        "parked_at": message.parked_at,
        "attempts": message.attempts,
        "headers": message.headers,
    }
    try:
        value["body"] = message.body.decode()
    except UnicodeDecodeError:
        value["body_base64"] = base64.b64encode(message.body).decode()
    return value


def parked_list(queue: str, messages: Sequence[ParkedMessage]) -> str:
    count = f"{len(messages)} parked" if messages else "empty"
    head = f"{queue}.parking: {count}"
    if not messages:
        return head
    rows = [
        [
            m.message_id,
            m.type,
            m.reason,
            shorten(m.error or "", ERROR_WIDTH) or None,
            m.parked_at,
            m.attempts,
        ]
        for m in messages
    ]
    return (
        head
        + "\n"
        + table(["message id", "type", "reason", "error", "parked at", "attempts"], rows, right=[5])
    )


def parked_detail(message: ParkedMessage) -> str:
    summary = fields(
        [
            ("queue", f"{message.queue}.parking"),
            ("message id", message.message_id),
            ("type", message.type),
            ("routing key", message.routing_key),
            ("reason", message.reason),
            ("error", message.error),
            ("parked at", message.parked_at),
            ("attempts", message.attempts),
        ]
    )
    headers = "\n".join(f"  {k}: {cell(v)}" for k, v in sorted(message.headers.items()))
    return f"{summary}\n\nheaders:\n{headers or '  none'}\n\nbody:\n{_body(message.body)}"


def _body(body: bytes) -> str:
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return f"({len(body)} bytes, not UTF-8) {body[:200]!r}"
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text if text else "(empty)"
