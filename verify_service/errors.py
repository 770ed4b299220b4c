"""Domain errors (cast_core.errors, each naming its status code) as gRPC statuses, and the decorator that applies
them to servicer methods."""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc
from opentelemetry import trace

from cast_core.errors import CastError
from cast_runtime.telemetry import cancellation_code, set_rpc_status

log = logging.getLogger(__name__)


def status_code(error: CastError) -> grpc.StatusCode:
    return grpc.StatusCode[error.status]


def abort_on_domain_error(method):
    """Wrap an async servicer method: a CastError aborts the call with its status code and message (field first).
    A call cancelled or past its deadline has that status recorded on its span."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except CastError as e:
            code = status_code(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unmapped domain error in %s", method.__name__)
            await context.abort(code, str(e))
        except asyncio.CancelledError:
            set_rpc_status(trace.get_current_span(), cancellation_code(context))
            raise

    return wrapper
