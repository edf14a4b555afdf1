"""The one error type of the server, shaped like OpenAI's error object.

Every problem a request can cause is raised as :class:`ApiError` deep inside parsing or
steering resolution and turned into ``{"error": {"message", "type", "param", "code"}}`` with
its status by one exception handler, so clients written for OpenAI (which read exactly those
fields) show the real reason, and no path through the server answers a bad request with 500.
"""

from __future__ import annotations

from typing import Any

#: OpenAI's ``type`` for each status we use.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    499: "invalid_request_error",
    503: "server_error",
    500: "server_error",
}


class ApiError(Exception):
    """A request problem with its HTTP status, the offending ``param`` and a machine ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = dict(headers or {})  # e.g. Retry-After on a 503, Allow on a 405
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients expect."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    """400: the request is malformed or a value is out of range."""
    return ApiError(400, message, param=param, code=code)


def client_closed() -> ApiError:
    """499 (nginx's "client closed request"): the client left before its answer; nobody reads it."""
    return ApiError(499, "the client closed the connection", code="client_closed")
