"""The one map from domain errors to gRPC status codes, and the decorator that applies it to servicer methods."""

from __future__ import annotations

import functools
import logging

import grpc

from cast_core.errors import (
    CastError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unimplemented,
)

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[CastError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


def status_code(error: CastError) -> grpc.StatusCode:
    for cls in type(error).__mro__:  # the most specific class that has a code
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def abort_on_domain_error(method):
    """Wrap an async servicer method: a CastError aborts the call with its status code and message (field first)."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except CastError as e:
            code = status_code(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unmapped domain error in %s", method.__name__)
            await context.abort(code, str(e))

    return wrapper
