"""Exceptions as gRPC statuses for the orchestrator: domain errors name their own code, downstream errors map here.
The HTTP API (http_api.py) maps the same statuses to HTTP ones."""

from __future__ import annotations

import grpc

from cast_core import errors


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message that a public API answers `exc` with. Errors of a downstream service keep their
    code and message."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        # A downstream deadline is this call's deadline; anything else a downstream says is our failure to serve.
        if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            code = grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.UNAVAILABLE else grpc.StatusCode.INTERNAL
        return code, f"downstream: {exc.details()}"
    code = grpc.StatusCode[exc.status] if isinstance(exc, errors.CastError) else grpc.StatusCode.INTERNAL
    return code, str(exc)


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Abort the call with the status for `exc`."""
    await context.abort(*status_of(exc))
