"""The one error type the HTTP APIs answer with: `{"error": code, "message": message}`.

Business code raises it without knowing about HTTP frameworks; the web layer renders it.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


def service_unavailable(code: str, message: str, retry_after_seconds: int = 1) -> ApiError:
    return ApiError(503, code, message, headers={"Retry-After": str(retry_after_seconds)})
