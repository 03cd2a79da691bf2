"""What can go wrong with a request, as exceptions that carry their HTTP status.

The runtime's own input errors (``ValueError``, ``TypeError``: bad size, steps, strength, scheduler,
image) become 400 with the runtime's message; :func:`status_of` is the one mapping, shared by both
APIs (each formats the body its clients expect).
"""

from __future__ import annotations


class ServeError(Exception):
    """A request the server answers with ``status`` (and ``code`` in the error body)."""

    status = 500
    code = "server_error"

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class BadRequest(ServeError):
    status, code = 400, "invalid_request"


class Unauthorized(ServeError):
    status, code = 401, "invalid_api_key"


class UnknownModel(ServeError):
    status, code = 404, "model_not_found"


class Interrupted(ServeError):
    """Stopped by ``/sdapi/v1/interrupt``."""

    status, code = 409, "interrupted"


class Cancelled(ServeError):
    """The client went away; nobody reads this answer (499 is nginx's "client closed request")."""

    status, code = 499, "cancelled"


class BodyTooLarge(ServeError):
    status, code = 413, "body_too_large"


class QueueFull(ServeError):
    status, code = 429, "queue_full"


class NotSupported(ServeError):
    status, code = 501, "not_supported"


class Draining(ServeError):
    status, code = 503, "shutting_down"


class DeadlineExceeded(ServeError):
    status, code = 504, "timeout"


def status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) of an exception raised while serving a request."""
    if isinstance(exc, ServeError):
        return exc.status, exc.code
    if isinstance(exc, (ValueError, TypeError)):  # the runtime's checks of the arguments
        return 400, "invalid_request"
    return 500, "server_error"
