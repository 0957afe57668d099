"""Errors a request can cause. The interceptor maps them to gRPC status codes in one place."""

from __future__ import annotations

STATUS_CODES = (
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "UNAUTHENTICATED",
)


class RequestError(Exception):
    """The request's fault (or a refusal): `code` is a grpc.StatusCode name, the message names the field."""

    def __init__(self, code: str, message: str):
        if code not in STATUS_CODES:
            raise ValueError(f"unknown status code {code!r}")
        super().__init__(message)
        self.code, self.message = code, message


def clip(text: str, limit: int = 64) -> str:
    """User input as it may appear in a message: a short prefix, repr-quoted."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"
