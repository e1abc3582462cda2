"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "code"}}`."""

from __future__ import annotations


class ApiError(Exception):
    """An error answer. `type` follows OpenAI's names (invalid_request_error, ...)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type: str, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code}}


def bad_request(message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def too_large(message: str) -> ApiError:
    return ApiError(413, message, "invalid_request_error", "payload_too_large")


def overloaded(message: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, message, "server_error", "overloaded", headers={"Retry-After": str(retry_after)})


# Prometheus outcome label of each status an answer can have
OUTCOMES = {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
            499: "cancelled", 500: "error", 503: "unavailable"}


def outcome(status: int) -> str:
    return OUTCOMES.get(status, "bad_request" if 400 <= status < 500 else "error")
