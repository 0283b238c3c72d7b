"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, streaming, models,
health and metrics. The event loop only reads requests, awaits results and writes answers:
parsing and tokenizing run in a small thread pool and decoding in the BatchScheduler's worker
thread, so `/health` and other requests are answered while either works."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

import anyio
import attrs
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .limits import ServerLimits
from .metrics import Metrics
from .requests import RequestError, Served, plan_rows
from .scheduler import BatchScheduler, Row, RowResult
from .schemas import ChatCompletionRequest, CompletionRequest

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
PREPARE_THREADS = 4  # requests parsed and tokenized at once (each in a thread, off the event loop)
MAX_JSON_DEPTH = 32  # the deepest nesting of arrays and objects a request body may have
# after --shutdown-timeout, what is still decoding is cancelled at its next step and answered 503;
# this much longer, the HTTP server closes whatever remains
SHUTDOWN_GRACE_S = 5.0


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped, for errors and /health: text that is not valid
    Unicode (a lone surrogate, which JSON's \\ud800 escapes can carry) is echoed back in an error
    instead of failing to encode. Answers keep UTF-8 (a model's text is valid Unicode)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def create_app(served: Served, *, limits: ServerLimits | None = None, api_key: str | None = None,
               threads: int | None = None, **limit_values) -> FastAPI:
    """The app for `served`; `limits` (or its fields as keywords: max_batch=8, ...) as ServerLimits."""
    limits = attrs.evolve(limits or ServerLimits(), **limit_values)
    metrics = Metrics()
    scheduler = BatchScheduler(served.model, max_batch=limits.max_batch, window_s=limits.batch_window_ms / 1000,
                               max_queue=limits.max_queue, metrics=metrics, threads=threads)
    preparing: list[anyio.CapacityLimiter] = []  # made on the event loop, at the first request

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop(timeout=SHUTDOWN_GRACE_S)

    # the OpenAPI schema and its pages are served below, behind the API key when there is one
    app = FastAPI(title="dare-pipeline", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.served, app.state.limits = scheduler, metrics, served, limits
    app.add_middleware(_CountRequests, metrics=metrics)
    expected = None if api_key is None else f"Bearer {api_key}".encode()

    def authorized(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1")  # as Starlette decoded it
        if not hmac.compare_digest(given, expected):  # constant time: no timing hints about the key
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               "authorization", "invalid_api_key", kind="authentication_error")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        # after a body refused unread (413) or late (408) the connection cannot carry another request
        closing = {"Connection": "close"} if error.status in (408, 413) else None
        return AsciiJSONResponse(error.body(), status_code=error.status, headers=closing)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}; endpoints: {list(ENDPOINTS)}"
        return AsciiJSONResponse(RequestError(error.status_code, message).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):  # logged by uvicorn; the client gets JSON
        return AsciiJSONResponse(RequestError(500, f"internal error: {type(error).__name__}: {error}",
                                              kind="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        problem = scheduler.problem()
        if problem is None:
            return {"status": "ok"}
        return AsciiJSONResponse({"status": "unavailable", **RequestError(503, problem, kind="server_error").body()},
                            status_code=503)

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics_text():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "dare-pipeline", "recipe": served.recipe.name}]}

    @app.get("/openapi.json", dependencies=[Depends(authorized)], include_in_schema=False)
    async def openapi():
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=[Depends(authorized)], include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="dare-pipeline")

    @app.get("/redoc", dependencies=[Depends(authorized)], include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="dare-pipeline")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        return await _decode(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        return await _decode(request, ChatCompletionRequest, chat=True)

    async def _decode(request: Request, schema, chat: bool):
        started = time.monotonic()
        endpoint = request.url.path
        raw = await _read_body(request, limits)
        if not preparing:
            preparing.append(anyio.CapacityLimiter(PREPARE_THREADS))
        body, specs = await anyio.to_thread.run_sync(_prepare, raw, schema, served, chat, limits.max_queue,
                                                     limiter=preparing[0])
        loop = asyncio.get_running_loop()
        events = asyncio.Queue() if body.stream else None
        rows = [Row(spec=spec, loop=loop, future=loop.create_future(), events=events) for spec in specs]
        scheduler.submit(rows)
        reply = _Reply(served.name, chat, rows, usage=bool(body.stream_options and body.stream_options.include_usage))
        if body.stream:
            stream = _stream(reply, events, request, lambda: metrics.latency.labels(endpoint).observe(
                time.monotonic() - started))
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _wait(rows, request)
        if results is None:  # the client left; its rows were dropped
            return Response(status_code=499)
        metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        return reply.complete(results)

    return app


async def _read_body(request: Request, limits: ServerLimits) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed --max-body-bytes, and (408)
    when it does not arrive within --read-timeout."""
    limit = limits.max_body_bytes
    too_large = RequestError(413, f"the request body is larger than {limit:,} bytes (--max-body-bytes)", None,
                             "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused before reading a byte of it
        raise too_large
    chunks, size = [], 0
    try:
        with anyio.fail_after(limits.read_timeout):  # raises TimeoutError when the body is late
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {limits.read_timeout:g} s "
                           "(--read-timeout)", None, "request_timeout") from None
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected while sending the request body") from None
    return b"".join(chunks)


def _prepare(raw: bytes, schema, served: Served, chat: bool, max_rows: int):
    """The validated body and its rows (runs in a worker thread: JSON parsing and tokenizing)."""
    body = _parse(raw, schema)
    return body, plan_rows(body, served, chat, max_rows)


class _CountRequests:
    """ASGI middleware counting answered requests by endpoint and status (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(path, str(status)).inc()


async def _wait(rows: list[Row], request: Request) -> list[RowResult] | None:
    """The rows' results in order, or None when the client disconnects first (its rows are dropped).
    A row that failed raises its error here (a RequestError answers with its status)."""
    futures = [r.future for r in rows]
    try:
        while True:
            _, pending = await asyncio.wait(futures, timeout=DISCONNECT_POLL_S)
            if not pending:
                return [f.result() for f in futures]
            if await request.is_disconnected():
                return None
    finally:
        for row in rows:
            if not row.future.done():
                row.cancelled = True


class _Reply:
    """OpenAI response and stream chunk shapes for one request."""

    def __init__(self, model_name: str, chat: bool, rows: list[Row], usage: bool = False):
        self.model, self.chat, self.rows = model_name, chat, rows
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.stream_usage = usage  # stream_options.include_usage: every chunk has `usage`, the last one filled

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        doc = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return doc | {"usage": None} if chunk and self.stream_usage else doc

    def usage(self, results: list[RowResult]) -> dict:
        prompt_tokens = sum(len(ids) for ids in {id(r.spec.ids): r.spec.ids for r in self.rows}.values())
        completion_tokens = sum(len(r.answer) for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def complete(self, results: list[RowResult]) -> dict:
        choices = []
        for row, result in zip(self.rows, results):
            text = result.text if result.text is not None else ""
            choice = {"index": row.spec.index, "finish_reason": result.finish_reason,
                      "dare": {"token_ids": result.answer, "nfe": result.nfe, "batch_size": result.batch_size,
                               "seed": row.spec.seed}}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice |= {"text": text, "logprobs": None}
            choices.append(choice)
        return self._envelope(chunk=False) | {"choices": choices, "usage": self.usage(results)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, extension: dict | None = None,
              role: bool = False) -> str:
        choice = {"index": index, "finish_reason": finish_reason}
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice |= {"text": text or "", "logprobs": None}
        if extension is not None:
            choice["dare"] = extension
        return _sse(self._envelope(chunk=True) | {"choices": [choice]})

    def usage_chunk(self, results: list[RowResult]) -> str:
        return _sse(self._envelope(chunk=True) | {"choices": [], "usage": self.usage(results)})


def _sse(doc: dict) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


async def _stream(reply: _Reply, events: asyncio.Queue, request: Request, on_end):
    """Server-sent events: per step and choice, the newly settled text and the committed positions;
    then per choice its finish reason; then the usage (with stream_options.include_usage); then
    `[DONE]`. A row that fails (or is cancelled at shutdown) ends the stream with an error event.
    A client that disconnects drops its rows."""
    rows = {row.spec.index: row for row in reply.rows}
    sent = dict.fromkeys(rows, "")
    open_rows = set(rows)
    next_check = time.monotonic() + DISCONNECT_POLL_S
    try:
        if reply.chat:
            for index in sorted(rows):
                yield reply.chunk(index, "", role=True)
        while open_rows:
            try:
                kind, index, _ = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                if await request.is_disconnected():
                    return
                continue
            if time.monotonic() >= next_check:  # events may flow without pause: look for a gone client now and then
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    return
            if index not in open_rows:  # a row answered once already (its batch failed after it): nothing more
                continue
            if kind == "step":
                steps = rows[index].take_steps()
                delta = _delta(sent[index], steps.pop("text"))
                sent[index] += delta
                if steps["positions"] or delta:
                    yield reply.chunk(index, delta, extension=steps)
                continue
            open_rows.discard(index)
            error = rows[index].future.exception()
            if error is not None:
                body = error.body() if isinstance(error, RequestError) else RequestError(
                    500, f"decoding failed: {type(error).__name__}: {error}", kind="server_error").body()
                yield _sse(body)
                return
            result = rows[index].future.result()
            yield reply.chunk(index, _delta(sent[index], result.text), finish_reason=result.finish_reason,
                              extension={"nfe": result.nfe, "batch_size": result.batch_size,
                                         "token_ids": result.answer, "seed": rows[index].spec.seed})
        if reply.stream_usage:
            yield reply.usage_chunk([rows[i].future.result() for i in sorted(rows)])
        yield "data: [DONE]\n\n"
        on_end()
    finally:
        for row in rows.values():
            if not row.future.done():
                row.cancelled = True


def _delta(sent: str, text: str | None) -> str:
    if not text or not text.startswith(sent):
        return ""
    return text[len(sent):]


def _parse(raw: bytes, schema):
    """The body as `schema`. Parsed here rather than by FastAPI so that any content type is read as
    JSON (curl's -d sends a form type) and every error names its field in OpenAI's error shape."""
    try:
        data = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise _invalid_json(f"arrays and objects nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        if "integer string conversion" in str(error):
            raise _invalid_json("a number has more than 4,300 digits") from None
        raise _invalid_json(str(error)) from None
    if not isinstance(data, dict):
        raise _invalid_json(f"the request body must be a JSON object, got {type(data).__name__}")
    if _nested_deeper(data, MAX_JSON_DEPTH):
        raise _invalid_json(f"arrays and objects nested deeper than {MAX_JSON_DEPTH}")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error.errors(), schema) from None


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def _invalid_json(reason: str) -> RequestError:
    return RequestError(400, f"the request body is not valid JSON: {reason}", None, "invalid_json")


def _nested_deeper(data, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _validation_error(errors: list, model) -> RequestError:
    first = errors[0]
    loc = list(first.get("loc", ()))
    # pydantic names union members in the location (e.g. prompt.str); keep the field path
    param = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc if not _is_type_tag(p))
    param = param.replace(".[", "[") or None
    if first.get("type") == "extra_forbidden":
        allowed = sorted(model.model_fields) if len(loc) == 1 else None
        return RequestError(400, f"{param}: unknown field" + (f"; allowed fields: {allowed}" if allowed else ""),
                            param, "unknown_field")
    shown = ""
    if first.get("type") != "missing":
        shown = f" = {json.dumps(first.get('input'), default=str)[:80]}"
    return RequestError(400, f"{param or 'body'}{shown}: {first['msg']}", param)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "list[int]", "list[str]") or part.startswith(
        ("list[", "function-")))
