"""Domain errors (cast_core.errors, each naming its status code) as gRPC statuses."""

from __future__ import annotations

from typing import NoReturn

import grpc

from cast_core.errors import CastError


def status_code(error: CastError) -> grpc.StatusCode:
    return grpc.StatusCode[error.status]


async def abort_with(context: grpc.aio.ServicerContext, error: CastError) -> NoReturn:
    """End the call with the error's status; the message starts with the field at fault ("budget.top_k: ...")."""
    await context.abort(status_code(error), str(error))
