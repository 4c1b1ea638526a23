"""What the origin answers when something goes wrong.

Every error carries its HTTP status, a machine-readable code and a public message; the error
middleware turns it into ``{"error": {"status", "code", "message"}}``. Client faults (4xx) and
upstream faults (storage, Redis: 5xx) are different classes.
"""

from __future__ import annotations


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
