"""The command line: argparse parsers for every command, configuration, and dispatch."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from pydantic import ValidationError

from libs.common.messages import payment_event_type
from libs.common.settings import CtlSettings
from libs.common.states import PaymentStatus
from tools.paymentsctl import commands, dlq, events
from tools.paymentsctl.api import DEFAULT_TIMEOUT_SECONDS
from tools.paymentsctl.commands import Context
from tools.paymentsctl.errors import CtlError, Usage
from tools.paymentsctl.output import Output

PROG = "paymentsctl"
STATUSES = tuple(status.value for status in PaymentStatus)
# Every status has its event, so a status added to the lifecycle is listed here at once.
EVENT_TYPES = tuple(payment_event_type(status) for status in PaymentStatus)
SCHEMES = ("seed", "standard", "both")

DESCRIPTION = """\
Operate the payments platform: pay, refund, cancel, look payments up, read the stats,
sign and send webhooks, run a reconciliation, follow payment events, and inspect or
replay parked messages.

Configuration comes from the environment (PAYMENTS_URL, PAYMENTS_API_KEY, WEBHOOK_SECRET,
RABBITMQ_URL); the options below override it. Options such as --json may be given
before or after the command."""

EPILOG = """\
exit codes:
  0  success
  1  the API refused (its error code and message are printed), or what was asked failed
  2  usage error
  3  cannot connect, or no answer in time"""


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{raw!r} must be more than 0")
    return value


def _page_size(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number from 1 to 100")
    return int(raw)


def _positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number of at least 1")
    return int(raw)


def _unix_seconds(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not Unix seconds") from None


def _key_value(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{raw!r} is not KEY=VALUE")
    return key, value


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, before or after its name.

    Sub-commands declare them with SUPPRESS defaults, so a value given before the command
    is not overwritten by the sub-command's default."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the raw JSON (for scripts) instead of tables",
    )
    group.add_argument("--url", default=default(None), help="the gateway's base URL (PAYMENTS_URL)")
    group.add_argument(
        "--api-key", default=default(None), help="the API key to send (PAYMENTS_API_KEY)"
    )
    group.add_argument(
        "--secret",
        default=default(None),
        help="the webhook signing secret; of a comma-separated list the first signs"
        " (WEBHOOK_SECRET)",
    )
    group.add_argument(
        "--rabbitmq-url",
        default=default(None),
        help="the broker, for dlq and events tail (RABBITMQ_URL)",
    )
    group.add_argument(
        "--http-timeout",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT_SECONDS),
        metavar="SECONDS",
        help=f"longest wait for one API call (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, suppress=False)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, summary: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name,
            parents=[common],
            help=summary,
            description=description or summary,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return sub

    pay = command(
        subcommands,
        "pay",
        "ask for a payment (POST /api/payments/pay)",
        "Ask for a payment. The amount is sent as a JSON string, so it stays exact.",
    )
    pay.add_argument(
        "--amount", required=True, help="e.g. 100.00 (no more decimals than the currency has)"
    )
    pay.add_argument("--currency", help="ISO 4217 code (the gateway's default: USD)")
    pay.add_argument("--customer", required=True, help="the customer id")
    pay.add_argument("--description", help="up to 500 characters")
    pay.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="retrying with the same key never creates a second payment",
    )
    pay.add_argument(
        "--metadata",
        type=_key_value,
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="string metadata, up to 20 pairs",
    )
    pay.set_defaults(handler=commands.pay)

    payments = command(subcommands, "payments", "look payments up")
    payments_commands = payments.add_subparsers(
        dest="payments_command", required=True, metavar="COMMAND"
    )
    get = command(
        payments_commands,
        "get",
        "one payment and its events (GET /api/payments/{id})",
    )
    get.add_argument("id", metavar="ID", help="the payment's id")
    get.set_defaults(handler=commands.payments_get)
    listing = command(
        payments_commands,
        "list",
        "payments, newest first (GET /api/payments)",
    )
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--customer", help="only this customer's payments")
    listing.add_argument(
        "--created-from", metavar="TIME", help="ISO 8601 with an offset, inclusive"
    )
    listing.add_argument("--created-to", metavar="TIME", help="ISO 8601 with an offset, exclusive")
    listing.add_argument(
        "--limit", type=_page_size, metavar="N", help="page size, 1 to 100 (default 20)"
    )
    listing.add_argument("--cursor", help="the next page's cursor, from the previous page")
    listing.add_argument("--all", action="store_true", help="follow the cursor through every page")
    listing.set_defaults(handler=commands.payments_list)

    refund = command(
        subcommands,
        "refund",
        "refund a payment, in part or in full (POST /api/payments/{id}/refunds)",
        "Ask for a refund of a completed (or partially refunded) payment. Without --amount,"
        " what is left to refund. The refund is pending until the provider settles it;"
        " follow it with `refunds get`.",
    )
    refund.add_argument("payment_id", metavar="PAYMENT_ID", help="the payment's id")
    refund.add_argument(
        "--amount", help="e.g. 25.00, in the payment's currency (default: what is left)"
    )
    refund.add_argument("--reason", help="why, up to 500 characters")
    refund.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="retrying with the same key never creates a second refund",
    )
    refund.set_defaults(handler=commands.refund)

    refunds = command(subcommands, "refunds", "look refunds up")
    refunds_commands = refunds.add_subparsers(
        dest="refunds_command", required=True, metavar="COMMAND"
    )
    refunds_list = command(
        refunds_commands, "list", "a payment's refunds (GET /api/payments/{id}/refunds)"
    )
    refunds_list.add_argument("payment_id", metavar="PAYMENT_ID")
    refunds_list.set_defaults(handler=commands.refunds_list)
    refunds_get = command(refunds_commands, "get", "one refund (GET /api/refunds/{id})")
    refunds_get.add_argument("id", metavar="REFUND_ID")
    refunds_get.set_defaults(handler=commands.refunds_get)

    cancel = command(
        subcommands,
        "cancel",
        "cancel a payment not charged yet (POST /api/payments/{id}/cancel)",
        "Cancel a pending payment the provider has not been asked to charge; it will never"
        " be. Refused (exit 1, payment_not_cancelable) once charging began.",
    )
    cancel.add_argument("payment_id", metavar="PAYMENT_ID", help="the payment's id")
    cancel.set_defaults(handler=commands.cancel)

    stats = command(
        subcommands, "stats", "counts and amounts by status and currency (GET /api/payments/stats)"
    )
    stats.set_defaults(handler=commands.stats)

    webhook = command(subcommands, "webhook", "sign and send provider webhooks")
    webhook_commands = webhook.add_subparsers(
        dest="webhook_command", required=True, metavar="COMMAND"
    )
    sign = command(
        webhook_commands,
        "sign",
        "print a file's signature headers",
        "Print the signature headers of a file's exact bytes as `Name: value` lines. The"
        " seed scheme's value is what `openssl dgst -sha256 -hmac SECRET FILE` prints.",
    )
    send = command(
        webhook_commands,
        "send",
        "POST a file's exact bytes, signed, to /api/webhooks",
        "POST a file's exact bytes to /api/webhooks with its signature headers, and print"
        " the receipt.",
    )
    for sub in (sign, send):
        sub.add_argument("file", metavar="FILE", help="the payload ('-' reads standard input)")
        sub.add_argument("--scheme", choices=SCHEMES, default="both", help="default: both")
        sub.add_argument("--id", metavar="MSG_ID", help="webhook-id (default: a new msg_<uuid>)")
        sub.add_argument(
            "--timestamp", type=_unix_seconds, metavar="T", help="webhook-timestamp (default: now)"
        )
    sign.set_defaults(handler=commands.webhook_sign)
    send.set_defaults(handler=commands.webhook_send)

    event_parser = command(subcommands, "events", "payment events: list the log, tail the bus")
    event_commands = event_parser.add_subparsers(
        dest="events_command", required=True, metavar="COMMAND"
    )
    event_list = command(event_commands, "list", "payment events, newest first (GET /api/events)")
    event_list.add_argument("--type", choices=EVENT_TYPES)
    event_list.add_argument("--payment", metavar="ID", help="only this payment's events")
    event_list.add_argument(
        "--created-from", metavar="TIME", help="ISO 8601 with an offset, inclusive"
    )
    event_list.add_argument(
        "--created-to", metavar="TIME", help="ISO 8601 with an offset, exclusive"
    )
    event_list.add_argument(
        "--limit", type=_page_size, metavar="N", help="page size, 1 to 100 (default 20)"
    )
    event_list.add_argument("--cursor", help="the next page's cursor, from the previous page")
    event_list.add_argument(
        "--all", action="store_true", help="follow the cursor through every page"
    )
    event_list.set_defaults(handler=events.events_list)
    tail = command(
        event_commands,
        "tail",
        "print payment events as they are published (RABBITMQ_URL)",
        "Bind a temporary queue to the platform's exchange and print each payment event"
        " as it arrives, one line each (one JSON object per line with --json), until"
        " Ctrl-C, --count events or --timeout.",
    )
    tail.add_argument(
        "--type",
        choices=EVENT_TYPES,
        action="append",
        help="only this type (repeatable; default: every payment event)",
    )
    tail.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="stop after N events (exit 3 if fewer came)",
    )
    tail.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="stop after this long"
    )
    tail.set_defaults(handler=events.events_tail)

    reconcile = command(
        subcommands,
        "reconcile",
        "run a reconciliation and print its summary",
        "Start a reconciliation run (POST /api/reconciliations), wait until it finishes"
        " and print its summary. Exits 1 when the run ends failed or partial.",
    )
    reconcile.add_argument("--no-wait", action="store_true", help="print the run's id and return")
    reconcile.add_argument(
        "--timeout",
        type=_positive_float,
        default=commands.RUN_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help=f"longest wait for the run to finish (default {commands.RUN_TIMEOUT_SECONDS:g})",
    )
    reconcile.set_defaults(handler=commands.reconcile)

    parking = command(
        subcommands,
        "dlq",
        "parked messages: list, show, replay, purge",
        "Inspect and operate the parking queues (through RabbitMQ, RABBITMQ_URL). A queue"
        " is named as payment-requested, webhook-received, reconciliation-requested or"
        " refund-requested, or by its full name.",
    )
    parking_commands = parking.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    dlq_list = command(parking_commands, "list", "parked messages with why they were parked")
    dlq_list.add_argument("queue", metavar="QUEUE", nargs="?", help="default: every consumer queue")
    dlq_list.set_defaults(handler=dlq.list_parked)
    show = command(parking_commands, "show", "one parked message: headers and body")
    show.add_argument("queue", metavar="QUEUE")
    show.add_argument("message_id", metavar="MESSAGE_ID")
    show.set_defaults(handler=dlq.show)
    for name, summary, handler in (
        ("replay", "republish parked messages to where they came from", dlq.replay),
        ("purge", "delete parked messages for good", dlq.purge),
    ):
        sub = command(parking_commands, name, summary)
        sub.add_argument("queue", metavar="QUEUE")
        which = sub.add_mutually_exclusive_group(required=True)
        which.add_argument("message_id", metavar="MESSAGE_ID", nargs="?", help="one message")
        which.add_argument("--all", action="store_true", help="every message of the queue")
        if name == "purge":
            sub.add_argument("--yes", action="store_true", help="confirm purge --all")
        sub.set_defaults(handler=handler)
    return parser


def load_settings(args: argparse.Namespace) -> CtlSettings:
    """The environment's configuration, with the command line's flags winning."""
    flags = {
        "payments_url": args.url,
        "payments_api_key": args.api_key,
        "webhook_secret": args.secret,
        "rabbitmq_url": args.rabbitmq_url,
    }
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    try:
        return CtlSettings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise Usage("invalid configuration: " + "; ".join(problems)) from None


def run(argv: Sequence[str], *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one command; return its exit code. --help and usage errors raise SystemExit."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if not logging.getLogger().handlers:
        # Alone in its process: the libraries' retry logs would bury the one clear message.
        logging.getLogger().addHandler(logging.NullHandler())
    args = build_parser().parse_args(argv)
    try:
        context = Context(
            settings=load_settings(args),
            out=Output(stdout, as_json=args.json),
            err=stderr,
            http_timeout=args.http_timeout,
        )
        code: int = asyncio.run(args.handler(args, context))
    except CtlError as exc:
        stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        stderr.write(f"{PROG}: interrupted\n")
        return 130
    return code
