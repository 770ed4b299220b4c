"""Bearer tokens on the public APIs (gRPC and HTTP), and limits per client.

The token file (`--auth-tokens FILE`) has one token per line and, after a space, the client's name; blank lines
and lines starting with `#` are skipped. A client without a name is called `client-` and its token's hash's
first 8 hex digits. Only the tokens' SHA-256 hashes are kept in memory, and a presented token's hash is compared
with every known one in constant time (hmac.compare_digest). The file is read again when it changes, so tokens
are added and revoked without a restart.

    gRPC: metadata `authorization: Bearer TOKEN`     HTTP: header `Authorization: Bearer TOKEN`
    none or not a bearer token: UNAUTHENTICATED (401)   unknown token: PERMISSION_DENIED (403)

Health checks and reflection stay open (Kubernetes probes and `grpcurl list` carry no token).

Per client, at most `max_live` requests are decoded at once; up to `max_queued` more wait for one of those to
finish; past that, RESOURCE_EXHAUSTED names both limits. One client cannot fill the server's batch or its queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from fastapi import Request

from cast_core.errors import CastError, ResourceExhausted
from cast_runtime.serving import handler_like

log = logging.getLogger("cast.orchestrator")

CLIENT: ContextVar[str] = ContextVar("cast_client", default="")  # the caller's name; "" without authentication
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # prefixes of methods that need no token
MIN_TOKEN_LENGTH = 16


class Unauthenticated(CastError):
    status = "UNAUTHENTICATED"


class PermissionDenied(CastError):
    status = "PERMISSION_DENIED"


def parse_tokens(text: str, source: str = "tokens") -> dict[bytes, str]:
    """{sha256(token): client name} from the file's text; ValueError naming the line when one is bad."""
    clients: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token, _, name = line.partition(" ")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"{source}:{number}: a token must have at least {MIN_TOKEN_LENGTH} characters")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in clients:
            raise ValueError(f"{source}:{number}: the same token is listed twice")
        clients[digest] = name.strip() or f"client-{digest.hex()[:8]}"
    if not clients:
        raise ValueError(f"{source}: no tokens")
    return clients


@dataclass
class TokenFile:
    path: Path
    clients: dict[bytes, str] = field(default_factory=dict, repr=False)
    _stamp: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.reload(strict=True)

    def reload(self, strict: bool = False) -> None:
        """Read the file again if it changed; a broken new version is logged and the old tokens stay."""
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size) == self._stamp:
                return
            self.clients = parse_tokens(self.path.read_text(), str(self.path))
            self._stamp = (st.st_mtime_ns, st.st_size)
        except (OSError, ValueError) as e:
            if strict:
                raise ValueError(f"auth_tokens: {e}") from e
            log.warning("the token file changed but cannot be read (the previous tokens stay): %s", e)

    def client_of(self, authorization: str | None) -> str:
        """The client's name for an `authorization` value, or Unauthenticated / PermissionDenied."""
        self.reload()
        scheme, _, token = (authorization or "").strip().partition(" ")
        if not authorization:
            raise Unauthenticated("missing: send 'authorization: Bearer TOKEN'", "authorization")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("not a bearer token: send 'authorization: Bearer TOKEN'", "authorization")
        digest = hashlib.sha256(token.strip().encode()).digest()
        name = None
        for known, client in self.clients.items():  # every hash compared: the time says nothing about which matched
            if hmac.compare_digest(digest, known):
                name = client
        if name is None:
            raise PermissionDenied("unknown token", "authorization")
        return name


# --- gRPC ---------------------------------------------------------------------------------------------------------

class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a known bearer token (health and reflection pass); the handler of an admitted call
    runs with CLIENT set to the caller's name."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        try:
            client = self.tokens.client_of(authorization if isinstance(authorization, str) else None)
        except CastError as exc:
            code, message = grpc.StatusCode[exc.status], str(exc)

            async def refuse(request, context):
                await context.abort(code, message)

            return handler_like(handler, lambda _: refuse)
        if handler.response_streaming:
            def as_client(inner):
                async def behavior(request, context):
                    CLIENT.set(client)
                    async for response in inner(request, context):
                        yield response
                return behavior
        else:
            def as_client(inner):
                async def behavior(request, context):
                    CLIENT.set(client)
                    return await inner(request, context)
                return behavior
        return handler_like(handler, as_client)


# --- limits per client --------------------------------------------------------------------------------------------

@dataclass
class _Client:
    live: int = 0
    waiting: list[asyncio.Future] = field(default_factory=list)


@dataclass
class ClientLimits:
    max_live: int    # requests of one client decoded at once; 0: no limit
    max_queued: int  # more of its requests that wait for one of those to finish
    clients: dict[str, _Client] = field(default_factory=dict)  # only clients with requests running or waiting

    def live(self, client: str) -> int:
        return self.clients[client].live if client in self.clients else 0

    @asynccontextmanager
    async def admitted(self, client: str):
        """Hold one of the client's live slots for the body; wait for one (queued), or RESOURCE_EXHAUSTED."""
        if not client or not self.max_live:
            yield
            return
        state = self.clients.setdefault(client, _Client())
        if state.live < self.max_live:
            state.live += 1
        elif len(state.waiting) >= self.max_queued:
            raise ResourceExhausted(
                f"client {client!r} has {state.live} requests running and {len(state.waiting)} queued: the limits "
                f"are client_max_live={self.max_live} and client_max_queued={self.max_queued}")
        else:
            turn = asyncio.get_running_loop().create_future()
            state.waiting.append(turn)
            try:
                await turn  # a finishing request hands its slot over
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._release(client, state)  # handed over as this request was cancelled: pass it on
                else:
                    state.waiting.remove(turn)
                    self._forget_if_idle(client, state)
                raise
        try:
            yield
        finally:
            self._release(client, state)

    def _release(self, client: str, state: _Client) -> None:
        while state.waiting:
            turn = state.waiting.pop(0)
            if not turn.done():
                turn.set_result(None)
                return
        state.live -= 1
        self._forget_if_idle(client, state)

    def _forget_if_idle(self, client: str, state: _Client) -> None:
        if not state.live and not state.waiting:
            self.clients.pop(client, None)

    def limit(self, generate: Callable[..., AsyncIterator]) -> Callable[..., AsyncIterator]:
        """`generate` (Router.generate) holding a live slot of the calling client (CLIENT) while it runs."""
        async def limited(*args) -> AsyncIterator:
            async with self.admitted(CLIENT.get()), aclosing(generate(*args)) as chunks:
                async for chunk in chunks:  # closed with this generator: the router releases its sequence
                    yield chunk
        return limited


# --- HTTP ---------------------------------------------------------------------------------------------------------

def http_authorizer(tokens: TokenFile):
    """The HTTP API's `authorize` (http_api.create_app): the Authorization header's client, or 401 / 403."""
    async def authorize(request: Request) -> None:
        CLIENT.set(tokens.client_of(request.headers.get("authorization")))

    return authorize


# --- clients (cast generate, cast bench, cast soak) ---------------------------------------------------------------

def add_client_flags(parser) -> None:
    parser.add_argument("--token", default=os.environ.get("CAST_API_TOKEN") or None,
                        help="bearer token for an orchestrator started with --auth-tokens (default $CAST_API_TOKEN)")
    parser.add_argument("--tls-ca", type=Path, default=None,
                        help="PEM CA of the orchestrator's certificate: connect over TLS (default: plaintext)")


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def public_channel(address: str, tls_ca: Path | None, aio: bool = False):
    """A channel to an orchestrator's gRPC API: TLS trusting `tls_ca`, else plaintext."""
    module = grpc.aio if aio else grpc
    if tls_ca is None:
        return module.insecure_channel(address)
    return module.secure_channel(address, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
