"""The life of a service's gRPC server, the same for the three: bind, health and reflection, SERVING, signals, drain.

    server = GrpcServer(SERVICE_NAME, host, port, tls=...) # bound at once: a taken port fails before a model loads
    add_FooServicer_to_server(servicer, server.server)
    await server.start()                                  # reflection, then SERVING on the health service
    await server.serve_until_signalled(grace_s, held=...) # on SIGTERM/SIGINT: NOT_SERVING, drain, stop
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cast_runtime.grpc_options import server_options
from cast_runtime.tls import CertificateFiles

log = logging.getLogger(__name__)


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """A grpc.aio server with the standard health and reflection services, NOT_SERVING until `start()`. With `tls`,
    the port serves TLS only (mutual TLS when it names a client CA), its certificate reloaded when the files change.
    `interceptors` see every call (the orchestrator's authentication)."""

    def __init__(self, service_name: str, host: str, port: int, max_concurrent_rpcs: int | None = None,
                 tls: CertificateFiles | None = None, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()):
        self.service_name = service_name
        # The options admit the orchestrator's keepalive pings (grpc_options.py); the interceptors refuse undecodable
        # requests and open the traced calls' server spans (telemetry.py).
        self.server = grpc.aio.server(options=server_options(), maximum_concurrent_rpcs=max_concurrent_rpcs,
                                      interceptors=[RefuseUndecodable(), *interceptors])
        self.address = bind_address(host, port)
        self.tls = tls
        self.port = (self.server.add_secure_port(self.address, tls.server_credentials()) if tls is not None
                     else self.server.add_insecure_port(self.address))
        if not self.port:
            raise OSError(f"could not bind {self.address}")
        self.address = bind_address(host, self.port)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    async def start(self) -> None:
        """Start serving and report SERVING, for the whole server ("") and for the service by name."""
        reflection.enable_server_reflection((self.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        await self.server.start()
        for name in ("", self.service_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def serve_until_signalled(self, grace_s: float, held: Callable[[], int] | None = None) -> None:
        await wait_for_signal()
        await self.drain_and_stop(grace_s, held)

    async def drain_and_stop(self, grace_s: float, held: Callable[[], int] | None = None) -> None:
        """Report NOT_SERVING at once (health checks, and so Kubernetes and the orchestrators, send no new work), then
        stop. With `held` (the sequences this replica holds), calls are answered until none is held (their
        orchestrators move them elsewhere) or `grace_s` passed; without it, running calls get `grace_s` to finish."""
        await self.health.enter_graceful_shutdown()
        if held is None:
            log.info("draining: NOT_SERVING, running calls get up to %.0f s", grace_s)
            await self.server.stop(grace_s)
            return
        log.info("draining: NOT_SERVING, serving the %d sequences held for up to %.0f s", held(), grace_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while held() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        await self.server.stop(1.0)


def handler_like(handler: grpc.RpcMethodHandler, behavior: Callable, deserializer: Callable | None = None):
    """A method handler of the same kind and serializers as `handler` that runs `behavior(handler's behavior)`."""
    make, kind = {
        (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
        (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
        (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
        (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
    }[handler.request_streaming, handler.response_streaming]
    return make(behavior(getattr(handler, kind)), request_deserializer=deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer)


class Undecodable:
    """What the lenient deserializer returns for bytes that are not the method's request message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """A request whose bytes do not parse as the method's message is INVALID_ARGUMENT, as any bad request; grpc.aio
    itself would answer UNKNOWN ("Unexpected DecodeError")."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # protobuf's DecodeError, or a deserializer's own
                return Undecodable(e)

        async def refuse(context, request: Undecodable) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: not a valid {details.method} message ({request.error})")

        async def checked(requests, context):
            async for request in requests:
                if isinstance(request, Undecodable):
                    await refuse(context, request)
                yield request

        def wrap(inner):
            # A streaming response comes from an async generator, or from a coroutine that writes to the context
            generates = handler.response_streaming and inspect.isasyncgenfunction(inner)
            if handler.request_streaming:
                if generates:
                    async def behavior(requests, context):
                        async for response in inner(checked(requests, context), context):
                            yield response
                else:
                    async def behavior(requests, context):
                        return await inner(checked(requests, context), context)
            elif generates:
                async def behavior(request, context):
                    if isinstance(request, Undecodable):
                        await refuse(context, request)
                    async for response in inner(request, context):
                        yield response
            else:
                async def behavior(request, context):
                    if isinstance(request, Undecodable):
                        await refuse(context, request)
                    return await inner(request, context)
            return behavior

        return handler_like(handler, wrap, lenient)


async def wait_for_signal() -> None:
    """Return on the first SIGTERM (Kubernetes stopping a pod) or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run(serve: Callable[[Any], Coroutine[Any, Any, None]], config: Any) -> None:
    """The processes' entry point: log to stderr, serve `config` until signalled."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
