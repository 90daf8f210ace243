"""Domain errors of the service; no grpc here (``tritarget.service.status`` maps them).

Each error says what went wrong in words a caller can act on. ``InvalidInput``
also carries field violations ``(field, description)``, e.g.
``("gt_boxes", "image 2, box 5: degenerate box (x2 <= x1): [...]")``.
"""

from __future__ import annotations

__all__ = [
    "ServiceError",
    "InvalidInput",
    "NotFound",
    "ResourceExhausted",
    "Overloaded",
    "Unauthenticated",
    "Unavailable",
    "DeviceLost",
    "Unimplemented",
    "invalid_from_exception",
]


class ServiceError(Exception):
    """Base of every error the service reports to a caller as-is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The request is malformed or its data is invalid (the caller must fix it)."""

    def __init__(self, message: str, violations: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.violations = violations if violations is not None else []


class NotFound(ServiceError):
    """A named thing (a preset) does not exist."""


class ResourceExhausted(ServiceError):
    """The request is over a configured limit; nothing was allocated for it."""


class Overloaded(ResourceExhausted):
    """The batcher's queue is full; retry later or against another replica."""


class Unauthenticated(ServiceError):
    """Missing or wrong credentials."""


class Unavailable(ServiceError):
    """The server cannot take the request now (starting, shutting down); retryable."""


class DeviceLost(Unavailable):
    """The server's GPU failed in a way its process cannot recover from (a CUDA error that
    stays: an illegal address, a device-side assert, an uncorrectable ECC error): every
    later call would fail, so the server stops for its supervisor to restart it. The
    caller retries on another replica."""


class Unimplemented(ServiceError):
    """No service of this server has the method called."""


def invalid_from_exception(exc: Exception) -> InvalidInput:
    """An ``InvalidInput`` from a library ``ValueError``/``TypeError``.

    The kernels' messages start with the offending field (``"gt_boxes: image 0, box 3:
    ..."``, ``"MatchConfig.high: ..."``); that becomes the field violation's field, and
    a message that starts otherwise is the request's.
    """
    text = str(exc)
    field, sep, description = text.partition(": ")
    if not sep or " " in field:
        return InvalidInput(f"request: {text}", [("request", text)])
    return InvalidInput(f"{field}: {description}", [(field, description)])
