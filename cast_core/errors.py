"""Domain errors shared by all services. Each service's errors.py maps them to gRPC status codes."""

from __future__ import annotations


class CastError(Exception):
    """Base class: `field` names the request field at fault (empty when none applies)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class InvalidArgument(CastError):
    """The request is malformed (INVALID_ARGUMENT)."""


class NotFound(CastError):
    """An unknown sequence id (NOT_FOUND)."""


class OutOfRange(CastError):
    """A value past a limit of the model or the service, such as a prompt longer than the context (OUT_OF_RANGE)."""


class FailedPrecondition(CastError):
    """The request does not fit the sequence's state, such as a stale start position (FAILED_PRECONDITION)."""


class ResourceExhausted(CastError):
    """No room for another sequence (RESOURCE_EXHAUSTED)."""


class Unimplemented(CastError):
    """A request option this release does not serve (UNIMPLEMENTED)."""
