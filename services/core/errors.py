"""Domain errors every service raises, each mapped to one HTTP status in one place
(`services.core.server_kit.install_error_handlers`) and rendered as `{"error": {"type", "message", "field"}}`.

Library code (stores, engines) raises these without knowing about HTTP frameworks; the message is written
for the caller and must never contain a secret.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a service reports to its caller. `status` is the HTTP status it maps to."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, retry_after_seconds: float | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_seconds = retry_after_seconds


class InvalidInput(ServiceError):
    """Input that passed the schema but breaks a rule only the service knows (a configured limit)."""

    status = 422
    type = "validation_error"


class NotFound(ServiceError):
    status = 404
    type = "not_found"


class Conflict(ServiceError):
    """The request conflicts with the service's state (e.g. weights are being updated)."""

    status = 409
    type = "conflict"


class PayloadTooLarge(ServiceError):
    status = 413
    type = "payload_too_large"


class Unavailable(ServiceError):
    """A dependency (Redis, the engine) is down or not ready; the caller may retry after a while."""

    status = 503
    type = "unavailable"

    def __init__(self, message: str, *, retry_after_seconds: float = 1.0, field: str | None = None):
        super().__init__(message, field=field, retry_after_seconds=retry_after_seconds)


class Unauthorized(ServiceError):
    """Missing or wrong bearer token on a mutating endpoint."""

    status = 401
    type = "unauthorized"


class MethodNotAllowed(ServiceError):
    status = 405
    type = "method_not_allowed"


class LengthRequired(ServiceError):
    """A body sent without a Content-Length where one is needed (a weight push)."""

    status = 411
    type = "length_required"


class UnsupportedMediaType(ServiceError):
    status = 415
    type = "unsupported_media_type"
