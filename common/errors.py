"""What every Kshipra service answers when something goes wrong: one JSON shape.

Every error body is ``{"error": {"status", "code", "message", …details}}`` (:func:`error_body`),
from the origin's API and from an edge alike. The origin raises the classes below (each
carries its HTTP status, a machine-readable code and a public message) and its error middleware
turns them into that body. Client faults (4xx) and upstream faults (storage, Redis: 5xx) are
different classes.
"""

from __future__ import annotations

import json
from typing import Any

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    410: "gone",
    411: "length_required",
    412: "precondition_failed",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media",
    416: "range_not_satisfiable",
    422: "unprocessable",
    429: "too_many_requests",
    431: "header_too_large",
    500: "internal_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


def error_body(
    status: int, message: str, code: str | None = None, **details: object
) -> dict[str, Any]:
    """The error body; *code* defaults to the status's own (``404`` → ``not_found``)."""
    code = code or _CODES.get(status, "error")
    return {"error": {"status": status, "code": code, "message": message, **details}}


def error_json(status: int, message: str, code: str | None = None) -> bytes:
    """:func:`error_body` as the bytes of a response body (with a final newline)."""
    return json.dumps(error_body(status, message, code)).encode() + b"\n"


class OriginError(Exception):
    """Root of the origin's errors."""

    status = 500
    code = "internal_error"

    def __init__(self, code: str | None = None, message: str = "", **details: object) -> None:
        super().__init__(message or self.code)
        if code is not None:
            self.code = code
        self.message = message or self.code
        self.details = details


class ClientFault(OriginError):
    """The request is wrong; retrying it unchanged will fail again."""

    status = 400
    code = "bad_request"


class BadRequest(ClientFault):
    status = 400


class Unauthorized(ClientFault):
    status = 401
    code = "unauthorized"


class Forbidden(ClientFault):
    status = 403
    code = "forbidden"


class NotFound(ClientFault):
    status = 404
    code = "not_found"


class Conflict(ClientFault):
    status = 409
    code = "conflict"


class PayloadTooLarge(ClientFault):
    status = 413
    code = "too_large"


class UnsupportedMedia(ClientFault):
    status = 415
    code = "unsupported_media"


class RangeNotSatisfiable(ClientFault):
    status = 416
    code = "range_not_satisfiable"


class Unprocessable(ClientFault):
    status = 422
    code = "unprocessable"


class UpstreamFault(OriginError):
    """Storage or Redis failed; the request may succeed later."""

    status = 503
    code = "unavailable"
