"""The one map from domain errors (cast_core.errors) to gRPC status codes."""

from __future__ import annotations

from typing import NoReturn

import grpc

from cast_core.errors import (
    CastError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)

STATUS_CODES: dict[type[CastError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code(error: CastError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, error: CastError) -> NoReturn:
    """End the call with the error's status; the message starts with the field at fault ("budget.top_k: ...")."""
    await context.abort(status_code(error), str(error))
