"""Domain errors (cast_core.errors, each naming its status code) as gRPC statuses."""

from __future__ import annotations

import grpc

from cast_core.errors import CastError


def status_code(error: CastError) -> grpc.StatusCode:
    return grpc.StatusCode[error.status]
