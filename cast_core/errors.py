"""Domain errors shared by all services. Each names its gRPC status code (by name: this module imports no grpc);
each service's errors.py turns it into a status."""

from __future__ import annotations


class CastError(Exception):
    """Base class: `field` names the request field at fault (empty when none applies)."""

    status = "INTERNAL"  # a grpc.StatusCode name

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class InvalidArgument(CastError):
    """The request is malformed (INVALID_ARGUMENT)."""

    status = "INVALID_ARGUMENT"


class NotFound(CastError):
    """An unknown sequence id (NOT_FOUND)."""

    status = "NOT_FOUND"


class OutOfRange(CastError):
    """A value past a limit of the model or the service, such as a prompt longer than the context (OUT_OF_RANGE)."""

    status = "OUT_OF_RANGE"


class FailedPrecondition(CastError):
    """The request does not fit the sequence's state, such as a stale start position (FAILED_PRECONDITION)."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(CastError):
    """No room for another sequence (RESOURCE_EXHAUSTED)."""

    status = "RESOURCE_EXHAUSTED"


class Unimplemented(CastError):
    """A request option this release does not serve (UNIMPLEMENTED)."""

    status = "UNIMPLEMENTED"


class Unavailable(CastError):
    """The service is shutting down; the client may retry elsewhere (UNAVAILABLE)."""

    status = "UNAVAILABLE"
