"""What can go wrong, each with the exit code it ends the command with."""

from __future__ import annotations

from typing import Any

OK = 0
REFUSED = 1
USAGE = 2
UNREACHABLE = 3


class CtlError(Exception):
    """A failure to report on stderr (one clear message) and exit with `exit_code`."""

    exit_code = REFUSED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Refused(CtlError):
    """The API answered with an error (4xx or 5xx)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or []
        self.retry_after = retry_after

    def __str__(self) -> str:
        lines = [f"{self.code} (HTTP {self.status}): {self.message}"]
        lines += [
            f"  {d.get('field', '?')}: {d.get('code', '?')}: {d.get('message', '')}"
            for d in self.details
        ]
        if self.retry_after:
            lines.append(f"  retry after {self.retry_after} s")
        return "\n".join(lines)


class NotFound(CtlError):
    """What was asked for is not there (a parked message, for instance)."""


class Usage(CtlError):
    """The command line or the configuration cannot work."""

    exit_code = USAGE


class Unreachable(CtlError):
    """The gateway or the broker cannot be reached, or did not answer in time."""

    exit_code = UNREACHABLE
