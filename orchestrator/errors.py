"""The one map from exceptions to gRPC status codes for the orchestrator."""

from __future__ import annotations

import grpc

from cast_core import errors

STATUS_FOR: dict[type[errors.CastError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Abort the call with the status for `exc`. Errors of a downstream service keep their code and message."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        # A downstream deadline is this call's deadline; anything else a downstream says is our failure to serve.
        if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            code = grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.UNAVAILABLE else grpc.StatusCode.INTERNAL
        await context.abort(code, f"downstream: {exc.details()}")
    code = STATUS_FOR.get(type(exc), grpc.StatusCode.INTERNAL)
    await context.abort(code, str(exc))
