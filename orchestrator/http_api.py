"""The OpenAI-compatible HTTP API, and the page at `/`, in the orchestrator's process and event loop beside gRPC:
the same step loop and the same request check (requests.py), no extra hop.

    POST /v1/completions        a text completion, whole or streamed as server-sent events (`stream: true`)
    POST /v1/chat/completions   the same for chat messages, where the tokenizer has a chat template
    GET  /v1/models             the one model served
    GET  /health                200 while the server runs
    GET  /                      a page that shows speculation at work (static/)

OpenAI fields this server does not serve (n > 1, logprobs, tools, ...) answer 400 naming the field, as do fields
it does not know; none is silently ignored. The project's own options and results travel under one field, `cast`:
in a request {"policy", "top_k", "ignore_eos", "step_stats"}; in a response the generated token ids, the
request's stats (the gRPC API's GenerationStats) and, with step_stats, each step's verified tree, accepted path and
where each token came from: the draft's tree, or the target's bonus token.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the HTTP status of the gRPC
status that the gRPC API answers. A client that disconnects ends its generation, whose sessions are released as
on a gRPC cancel. Authentication plugs in as one FastAPI dependency on /v1 (create_app's `authorize`).

Each completion is traced as the gRPC API's Generate is (telemetry.py): a server span `POST /v1/...`, a child of the
W3C trace context in the request's headers where there is one, with the GenAI attributes; `cast.trace_id` in the
response names its trace.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

import grpc
import jinja2
import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from google.protobuf.json_format import MessageToDict
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from cast_core.errors import CastError, InvalidArgument, NotFound
from cast_core.tree import TokenTree
from cast_runtime.telemetry import trace_id
from cast_runtime.tls import CertificateFiles
from orchestrator.auth import ClientLimits
from orchestrator.decoding import Chunk, GenerationRequest
from orchestrator.errors import status_of
from orchestrator.requests import RequestBuilder
from orchestrator.servicer import stats_to_proto, timing_fields
from orchestrator.router import Router
from orchestrator.telemetry import FINISH_REASONS

STATIC = Path(__file__).parent / "static"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to as many as fit

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}  # anything else: 500
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error"}  # else server_error

# OpenAI request fields this server does not serve, with the values that ask for nothing: those (and null) are
# accepted as if absent; any other value answers 400. A value matches only with its own type (0 is not False).
NEUTRAL = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logprobs": (False,), "top_logprobs": (0,),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (),
    "response_format": ({"type": "text"},), "store": (False,), "metadata": (), "service_tier": ("auto", "default"),
    "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (),
    "verbosity": (), "prompt_cache_key": (), "safety_identifier": (),
}


class UnsupportedField(InvalidArgument):
    code = "unsupported_parameter"


class UnknownField(InvalidArgument):
    code = "unknown_parameter"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# --- requests -----------------------------------------------------------------------------------------------------

class Extension(BaseModel):
    """The request's `cast` field: this project's own options."""

    model_config = ConfigDict(extra="forbid")
    policy: str = ""           # cast, eagle2, chain or ar; "": the server's default
    top_k: int = 0             # 0: off
    ignore_eos: bool = False
    step_stats: bool = False   # each step's tree, accepted path and tokens' sources


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: Literal[False] | None = None  # padding against length side channels: not served


class Sampling(BaseModel):
    """Fields of both endpoints. Other fields land in model_extra, where check_extra_fields judges them."""

    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = None  # None: 1, as OpenAI's
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None           # an end-user id, as OpenAI's; it does not change the output
    stream: bool = False
    stream_options: StreamOptions | None = None
    cast: Extension | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def check_extra_fields(body: Sampling) -> None:
    for field, value in (body.model_extra or {}).items():
        if field not in NEUTRAL:
            raise UnknownField("unknown field (this server's own options go under `cast`)", field)
        if value is not None and not any(type(value) is type(n) and value == n for n in NEUTRAL[field]):
            raise UnsupportedField(f"not supported by this server (got {json.dumps(value)[:80]})", field)
    if body.stream_options is not None and not body.stream:
        raise InvalidArgument("only allowed with stream: true", "stream_options")


def one_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str | list[int]:
    """The request's prompt: text or token ids. A list of prompts (a batch) is one prompt or a 400."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise InvalidArgument(f"one prompt per request, got {len(prompt)}", "prompt")
        return prompt[0]
    return prompt


def validation_error(exc: RequestValidationError) -> InvalidArgument:
    """pydantic's complaint as a 400 naming the field: messages[0].role. Of several, the deepest: where a value
    fits no member of a union (`content`: a string or text parts), the member that it came nearest to."""
    first = max(exc.errors(), key=lambda e: len(e["loc"]))
    if first["type"] == "json_invalid":
        return InvalidArgument(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    param = ""
    for part in first["loc"][1:]:  # loc[0] is "body"
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "float", "bool"):  # not a union member's tag
            param += f".{part}" if param else part
    return InvalidArgument(first["msg"], param)


# --- responses ----------------------------------------------------------------------------------------------------

def error_response(exc: Exception) -> JSONResponse:
    code, message = status_of(exc)
    status = HTTP_STATUS.get(code, 500)
    param, api_code = None, code.name.lower()
    if isinstance(exc, CastError):  # (not an AioRpcError's code() method)
        param, api_code = exc.field or None, getattr(exc, "code", api_code)
    body = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": api_code}
    return JSONResponse({"error": body}, status_code=status)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events. `on_close` runs however the response ends (finished, failed, or its client gone):
    the generation ends there, and its sessions are released as on a gRPC cancel."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def unless_disconnected(request: Request, work: Awaitable):
    """Await `work`; when the client disconnects first, cancel it (ending its generation) and raise ClientGone."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


class StepView:
    """One request's steps as the `cast.step` objects of its responses: the verified tree, the accepted path and
    each committed token's text and source.

    A step's tokens walk down its tree from the root: a token that is a child of the last accepted node came from
    the draft; the first one that is not is the target's bonus token (acceptance never rejects a child and then
    samples it, so the bonus token is no child of that node). Token texts come from incremental detokenisation
    (as vLLM's): a token that ends inside a character shows nothing, and a later token shows the character.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-4:])  # a little prompt context, as TextAssembler decodes with
        self.prefix = 0                   # ids[prefix:read] decoded to the text already shown
        self.read = len(self.ids)

    def piece(self, token: int, last: bool = False) -> str:
        """The text that `token` adds; `last`: the output's last token, which shows whatever is left."""
        self.ids.append(token)
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if text.endswith("\ufffd") and not last:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]

    def step(self, chunk: Chunk) -> dict | None:
        if chunk.step is None or chunk.tree is None:
            return None
        tree: TokenTree = chunk.tree
        node: int | None = 0
        path, tokens = [], []
        for i, token in enumerate(chunk.token_ids):
            last = chunk.finish_reason is not None and i == len(chunk.token_ids) - 1
            children = np.nonzero((tree.parents == node) & (tree.tokens == token))[0] if node is not None else ()
            if len(children):
                node = int(children[0])
                path.append(node)
            else:
                node = None
            tokens.append({"id": token, "text": self.piece(token, last),
                           "source": "draft" if node is not None else "bonus"})
        record = chunk.step
        return {
            "expanded_nodes": record.expanded_nodes, "verified_nodes": record.verified_nodes, "depth": record.depth,
            "accepted_tokens": record.accepted_tokens, **timing_fields(record.timing),
            "tree": {"tokens": tree.tokens.tolist(), "parents": tree.parents.tolist(),
                     "texts": self.tokenizer.batch_decode(tree.tokens[:, None].tolist())},
            "accepted_path": path,
            "tokens": tokens,
        }


def stats_json(chunk: Chunk) -> dict:
    """The request's stats, as the gRPC API's GenerationStats (without its per-step list)."""
    stats = MessageToDict(stats_to_proto(chunk.stats, with_steps=False), preserving_proto_field_name=True,
                          always_print_fields_with_no_presence=True)
    del stats["step_stats"]  # the HTTP API's steps are richer: `steps` / `step`
    return stats


# --- the API --------------------------------------------------------------------------------------------------

async def allow_all(request: Request) -> None:
    """The default `authorize`: every request may call /v1. An authorizer raises a CastError (UNAUTHENTICATED:
    401, PERMISSION_DENIED: 403) to refuse one."""


class HttpApi:
    def __init__(self, router: Router, requests: RequestBuilder, model_id: str,
                 limits: ClientLimits | None = None) -> None:
        self.router = router
        self.route = limits.limit(router.generate) if limits is not None else router.generate
        self.requests = requests
        self.tokenizer = requests.tokenizer
        self.model_id = model_id
        self.created = int(time.time())

    async def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "cast-serve",
            "cast": {"max_context": self.requests.max_context, "policies": sorted(self.requests.policies),
                     "default_policy": self.requests.default_policy, "chat": bool(self.tokenizer.chat_template)},
        }]}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self.traced(request, lambda span: self.completion(body, request, span))

    async def completion(self, body: CompletionRequest, request: Request, span: trace.Span) -> Response:
        self.check(body)
        max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        generation = self.build(body, one_prompt(body.prompt), max_tokens, {"max_new_tokens": "max_tokens"})
        return await self.respond(request, body, generation, chat=False, span=span)

    async def chat_completions(self, body: ChatRequest, request: Request) -> Response:
        return await self.traced(request, lambda span: self.chat_completion(body, request, span))

    async def chat_completion(self, body: ChatRequest, request: Request, span: trace.Span) -> Response:
        self.check(body)
        if not self.tokenizer.chat_template:
            raise InvalidArgument(f"the model {self.model_id!r} has no chat template (its tokenizer defines none): "
                                  "use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                     "".join(p.text for p in m.content), **({"name": m.name} if m.name else {})} for m in body.messages]
        try:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as exc:
            raise InvalidArgument(f"the chat template refused them: {exc}", "messages") from None
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        generation = self.build(body, prompt, max_tokens, {"max_new_tokens": field, "prompt": "messages"})
        return await self.respond(request, body, generation, chat=True, span=span)

    async def traced(self, request: Request, handle: Callable[[trace.Span], Awaitable[Response]]) -> Response:
        """Answer the request under its server span, which ends with the response (a stream's: when it closes)."""
        route = request.url.path
        span = self.router.telemetry.tracer.start_span(
            f"POST {route}", context=propagate.extract(request.headers), kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route, "url.path": route})
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                response = await handle(span)
        except BaseException as exc:
            end_http_span(span, error_response(exc).status_code if isinstance(exc, Exception) else 499)
            raise
        if isinstance(response, EventStream):
            on_close = response.on_close

            async def close_and_end() -> None:
                await on_close()
                end_http_span(span, response.status_code)

            response.on_close = close_and_end
        else:
            end_http_span(span, response.status_code)
        return response

    def generate(self, generation: GenerationRequest, chat: bool, span: trace.Span) -> AsyncIterator[Chunk]:
        """The generation's chunks, traced and measured (telemetry.py) under the request's span."""
        return self.router.telemetry.observe(self.route(generation, span), generation,
                                             "chat" if chat else "text_completion", span)

    def check(self, body: Sampling) -> None:
        check_extra_fields(body)
        if body.model != self.model_id:
            raise ModelNotFound(f"this server serves {self.model_id!r}, not {body.model!r}", "model")

    def build(self, body: Sampling, prompt: str | list[int], max_tokens: int | None,
              names: dict[str, str]) -> GenerationRequest:
        ext = body.cast or Extension()
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return self.requests.build(
            prompt, max_tokens, policy=ext.policy, stop=stop,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=ext.top_k, seed=body.seed,
            ignore_eos=ext.ignore_eos, names={**names, "policy": "cast.policy", "top_k": "cast.top_k"},
        )

    async def respond(self, request: Request, body: Sampling, generation: GenerationRequest, chat: bool,
                      span: trace.Span) -> Response:
        view = StepView(self.tokenizer, generation.prompt_ids) if body.cast and body.cast.step_stats else None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_id}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await self.stream(request, generation, chat, head, view, include_usage, span)
        return await self.whole(request, generation, chat, head, view, span)

    async def whole(self, request: Request, generation: GenerationRequest, chat: bool, head: dict,
                    view: StepView | None, span: trace.Span) -> JSONResponse:
        async def collect() -> list[Chunk]:
            async with aclosing(self.generate(generation, chat, span)) as stream:
                return [chunk async for chunk in stream]

        chunks = await unless_disconnected(request, collect())
        final = chunks[-1]
        text = "".join(c.text for c in chunks)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
        ext = {"token_ids": [t for c in chunks for t in c.token_ids], "stats": stats_json(final),
               **traced_as(span)}
        if view is not None:
            ext["steps"] = [s for s in map(view.step, chunks) if s is not None]
        return JSONResponse({
            **head, "object": "chat.completion" if chat else "text_completion",
            "choices": [{**choice, "logprobs": None, "finish_reason": FINISH_REASONS[final.finish_reason]}],
            "usage": usage(generation, final), "cast": ext,
        })

    async def stream(self, request: Request, generation: GenerationRequest, chat: bool, head: dict,
                     view: StepView | None, include_usage: bool, span: trace.Span) -> EventStream:
        stream = self.generate(generation, chat, span)
        traced = traced_as(span)
        # The first chunk is awaited here, so that what fails before any token (a full server: 429) has its status.
        try:
            first = await unless_disconnected(request, anext(stream))
        except BaseException:
            await stream.aclose()
            raise
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(chunk: Chunk, delta: dict) -> str:
            finish = FINISH_REASONS[chunk.finish_reason] if chunk.finish_reason is not None else None
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": chunk.text}
            ext: dict[str, Any] = {"token_ids": chunk.token_ids, **traced}
            if view is not None and (step := view.step(chunk)) is not None:
                ext["step"] = step
            if finish is not None:
                ext["stats"] = stats_json(chunk)
            data = {**head, "object": kind, "choices": [{**choice, "logprobs": None, "finish_reason": finish}],
                    "cast": ext}
            if include_usage:
                data["usage"] = None
            return sse(data)

        async def events() -> AsyncIterator[str]:
            chunk = first
            yield event(chunk, {"role": "assistant", "content": chunk.text})
            try:
                while chunk.finish_reason is None:
                    chunk = await anext(stream)
                    yield event(chunk, {"content": chunk.text})
            except Exception as exc:  # the status went out already: an error event, as OpenAI's
                yield sse(json.loads(error_response(exc).body))
            else:
                if include_usage:
                    yield sse({**head, "object": kind, "choices": [], "usage": usage(generation, chunk)})
            yield sse("[DONE]")

        return EventStream(events(), stream.aclose)


def traced_as(span: trace.Span) -> dict:
    """{"trace_id": ...} where the request is traced."""
    tid = trace_id(span)
    return {"trace_id": tid} if tid else {}


def end_http_span(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:  # a server span's error (HTTP conventions); 4xx are the client's
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def usage(generation: GenerationRequest, final: Chunk) -> dict:
    prompt = len(generation.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": final.completion_tokens,
            "total_tokens": prompt + final.completion_tokens}


def create_app(router: Router, requests: RequestBuilder, model_id: str,
               authorize: Callable[[Request], Awaitable[None]] = allow_all,
               limits: ClientLimits | None = None) -> FastAPI:
    """The HTTP API on `router`. `authorize` guards every /v1 route (the page and /health stay open); `limits`
    bound each client's requests (auth.py)."""
    api = HttpApi(router, requests, model_id, limits)
    app = FastAPI(title="CAST Serve", summary="OpenAI-compatible API of the orchestrator", redoc_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    v1.add_api_route("/models", api.models, methods=["GET"])
    v1.add_api_route("/completions", api.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", api.chat_completions, methods=["POST"])
    app.include_router(v1)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "serving"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(CastError)
    @app.exception_handler(grpc.aio.AioRpcError)
    @app.exception_handler(Exception)  # a bug: 500, in the same shape
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        status = exc.status_code
        body = {"message": str(exc.detail), "type": ERROR_TYPES.get(status, "server_error" if status >= 500
                                                                    else "invalid_request_error"),
                "param": None, "code": None}
        return JSONResponse({"error": body}, status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def on_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it

    return app


class HttpServer:
    """uvicorn serving an app in this event loop, on a socket bound before start() returns (port 0: any free one)."""

    def __init__(self, app: FastAPI, host: str, port: int, grace_s: float = 5.0,
                 tls: CertificateFiles | None = None) -> None:
        # log_config None: the orchestrator's logging stays as it is; uvicorn says only what goes wrong.
        tls_files = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)} if tls is not None else {}
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                                    lifespan="off", timeout_graceful_shutdown=grace_s, **tls_files))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.port: int = self.socket.getsockname()[1]
        self.task: asyncio.Task | None = None
        # Its own view of the files (the gRPC server's notes what it loaded separately)
        self.tls = CertificateFiles(tls.cert, tls.key) if tls is not None else None
        self.watch: asyncio.Task | None = None

    async def start(self) -> int:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.socket]), name="http")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # start-up failed: raise why
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        if self.tls is not None:
            self.tls.load()
            self.watch = asyncio.get_running_loop().create_task(self.reload_certificate(), name="http-tls")
        return self.port

    async def reload_certificate(self, every_s: float = 2.0) -> None:
        """Load the certificate again when its files change: new connections get it (as the gRPC API's do)."""
        while True:
            await asyncio.sleep(every_s)
            if self.tls.fetch() is not None:  # a whole, matching pair
                self.server.config.ssl.load_cert_chain(self.tls.cert, self.tls.key)

    async def stop(self) -> None:
        """Stop accepting, let running requests finish for the grace period, then cancel them (which ends
        their generations)."""
        if self.watch is not None:
            self.watch.cancel()
        if self.task is not None:
            self.server.should_exit = True
            await self.task
