"""Domain errors (cast_core.errors, each naming its status code) as gRPC statuses, and the decorator that applies
them to servicer methods."""

from __future__ import annotations

import functools
import logging

import grpc

from cast_core.errors import CastError

log = logging.getLogger(__name__)


def status_code(error: CastError) -> grpc.StatusCode:
    return grpc.StatusCode[error.status]


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
