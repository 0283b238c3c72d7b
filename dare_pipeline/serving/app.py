"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, streaming, models,
health and metrics. Decoding happens in the BatchScheduler's worker thread; handlers only plan
rows, enqueue them and await their results."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import Metrics
from .requests import RequestError, Served, plan_rows
from .scheduler import BatchScheduler, Row, RowResult
from .schemas import ChatCompletionRequest, CompletionRequest

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def create_app(served: Served, *, max_batch: int = 16, batch_window_ms: float = 20.0, max_queue: int = 256,
               api_key: str | None = None, threads: int | None = None) -> FastAPI:
    metrics = Metrics()
    scheduler = BatchScheduler(served.model, max_batch=max_batch, window_s=batch_window_ms / 1000,
                               max_queue=max_queue, metrics=metrics, threads=threads)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop(timeout=30.0)

    app = FastAPI(title="dare-pipeline", lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.served = scheduler, metrics, served
    app.add_middleware(_CountRequests, metrics=metrics)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               "authorization", "invalid_api_key", kind="authentication_error")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse(RequestError(error.status_code, f"{request.method} {request.url.path}: {error.detail}; "
                                         f"endpoints: {list(ENDPOINTS)}").body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):  # logged by uvicorn; the client gets JSON
        return JSONResponse(RequestError(500, f"decoding failed: {type(error).__name__}: {error}",
                                         kind="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics_text():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "dare-pipeline", "recipe": served.recipe.name}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        return await _decode(await _parse(request, CompletionRequest), request, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        return await _decode(await _parse(request, ChatCompletionRequest), request, chat=True)

    async def _decode(body, request: Request, chat: bool):
        started = time.monotonic()
        endpoint = request.url.path
        specs = plan_rows(body, served, chat)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue() if body.stream else None
        rows = [Row(spec=spec, loop=loop, future=loop.create_future(), events=events) for spec in specs]
        scheduler.submit(rows)
        reply = _Reply(served.name, chat, rows)
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

    def __init__(self, model_name: str, chat: bool, rows: list[Row]):
        self.model, self.chat, self.rows = model_name, chat, rows
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def complete(self, results: list[RowResult]) -> dict:
        choices = []
        for row, result in zip(self.rows, results):
            text = result.text if result.text is not None else ""
            choice = {"index": row.spec.index, "finish_reason": result.finish_reason,
                      "dare": {"token_ids": result.answer, "nfe": result.nfe, "batch_size": result.batch_size}}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice |= {"text": text, "logprobs": None}
            choices.append(choice)
        prompt_tokens = sum(len(ids) for ids in {id(r.spec.ids): r.spec.ids for r in self.rows}.values())
        completion_tokens = sum(len(r.answer) for r in results)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return self._envelope(chunk=False) | {"choices": choices, "usage": usage}

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


def _sse(doc: dict) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


async def _stream(reply: _Reply, events: asyncio.Queue, request: Request, on_end):
    """Server-sent events: per step and choice, the newly settled text and the committed positions;
    then per choice its finish reason; then `[DONE]`. A client that disconnects drops its rows."""
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
                kind, index, payload = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if time.monotonic() >= next_check:  # events may flow without pause: look for a gone client now and then
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    return
            if kind == "step":
                step, prompt = payload
                delta = _delta(sent[index], prompt.text)
                sent[index] += delta
                if prompt.positions or delta:
                    yield reply.chunk(index, delta, extension={
                        "step": step, "positions": list(prompt.positions), "token_ids": list(prompt.token_ids),
                        "settled": prompt.settled})
                continue
            open_rows.discard(index)
            error = rows[index].future.exception()
            if error is not None:
                body = error.body() if isinstance(error, RequestError) else RequestError(
                    500, f"decoding failed: {error}", kind="server_error").body()
                yield _sse(body)
                return
            result = rows[index].future.result()
            yield reply.chunk(index, _delta(sent[index], result.text), finish_reason=result.finish_reason,
                              extension={"nfe": result.nfe, "batch_size": result.batch_size,
                                         "token_ids": result.answer})
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


async def _parse(request: Request, model):
    """The body as `model`. Parsed here rather than by FastAPI so that any content type is read as
    JSON (curl's -d sends a form type) and every error names its field in OpenAI's error shape."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the request body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(data).__name__}", None,
                           "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error.errors(), model) from None


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
