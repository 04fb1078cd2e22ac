"""OpenAI-compatible HTTP API over the engine (FastAPI; server-sent events for streams).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health,
GET /metrics (Prometheus text). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.
With an API key, every path but /health needs `Authorization: Bearer KEY` (compared in
constant time); bodies are UTF-8 JSON of at most `max_request_bytes` (serve/body.py).
A client that disconnects, or a request past its timeout, is cancelled and its KV pages
are freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from . import responses
from .body import Guard, error_response
from .engine import Engine, EngineFull, PromptTooLong
from .metrics import Metrics
from .responses import APIError, Reply
from .schemas import ChatCompletionRequest, CompletionRequest
from .validation import batch_problem, lone_surrogate, sampling_problem

__all__ = ["APIError", "AppState", "create_app"]


@dataclass
class AppState:
    """What the routes share: the engine and how this server presents it."""

    engine: Engine
    model_name: str
    request_timeout: float = 600.0
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        mc = self.engine.model.config
        self.vocab_size = (mc.get_text_config() if hasattr(mc, "get_text_config") else mc).vocab_size
        self.metrics = Metrics(self.engine)
        self.tokenizer = self.engine.tokenizer


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_request_bytes: int = 1 << 20,
               request_timeout: float = 600.0) -> FastAPI:
    engine.deliver = _deliver
    app = FastAPI(title="llmzip", lifespan=_lifespan)
    app.state.llmzip = AppState(engine, model_name, request_timeout)
    app.add_middleware(Guard, api_key=api_key, max_bytes=max_request_bytes)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    engine = app.state.llmzip.engine
    engine.start()
    try:
        yield
    finally:
        engine.shutdown()


def _state(request: Request) -> AppState:
    return request.app.state.llmzip


async def _invalid(request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}" if errs
                          else "invalid request", param=where or None)


async def _api_error(request, exc: APIError):
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)


async def _http_error(request, exc: HTTPException):
    return error_response(exc.status_code, str(exc.detail),
                          "invalid_request_error" if exc.status_code < 500 else "server_error")


router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request):
    return PlainTextResponse(_state(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    st = _state(request)
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                        "owned_by": "llmzip", "max_model_len": st.engine.config.max_model_len}]}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    st = _state(request)
    _check(st, req)
    prompts = _prompt_ids(st, req.prompt)
    jobs = []
    for ids in prompts:
        max_tokens = _limits(st, ids, req.max_tokens, 16)
        jobs += [(ids, _sampling(req, max_tokens, req.logprobs, c)) for c in range(req.n)]
    reply = Reply(f"cmpl-{uuid.uuid4().hex}", "text_completion", st.model_name, req.n, prompts, False, st.tokenizer)
    return await _respond(st, request, req, jobs, reply)


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request):
    st = _state(request)
    _check(st, req)
    tok = st.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
    try:
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    max_tokens = _limits(st, ids, req.max_completion_tokens or req.max_tokens, None)
    k = (req.top_logprobs or 0) if req.logprobs else None
    jobs = [(ids, _sampling(req, max_tokens, k, c)) for c in range(req.n)]
    obj = "chat.completion.chunk" if req.stream else "chat.completion"
    reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", obj, st.model_name, req.n, [ids], True, tok)
    return await _respond(st, request, req, jobs, reply)


async def _respond(st: AppState, request: Request, req, jobs: list, reply: Reply):
    events = _run(st, request, jobs)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(responses.chunks(events, reply, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    body = await responses.whole(events, reply, len(jobs))
    return JSONResponse({}, status_code=499) if body is None else body  # None: the client went away


def _check(st: AppState, req) -> None:
    if req.model != st.model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server has {st.model_name!r}",
                       param="model", code="model_not_found")
    why = req.unsupported()
    if why:
        raise APIError(400, why)
    where = lone_surrogate(req.model_dump())
    if where:
        raise APIError(400, f"{where}: text holds a lone UTF-16 surrogate; send valid Unicode", param=where)
    bad = sampling_problem(req, st.vocab_size)
    if bad:
        raise APIError(400, bad[0], param=bad[1])


def _prompt_ids(st: AppState, prompt) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    tok, out = st.tokenizer, []
    for p in prompts:
        ids = tok(p).input_ids if isinstance(p, str) else list(p)
        if any(not 0 <= t < len(tok) for t in ids):
            raise APIError(400, "prompt has token ids outside the vocabulary", param="prompt")
        out.append(ids)
    return out


def _limits(st: AppState, ids: list[int], asked: int | None, default: int | None) -> int:
    max_len = st.engine.config.max_model_len
    room = max_len - len(ids)
    if room < 1 or (asked is not None and asked > room):
        raise APIError(400, f"this model's maximum context length is {max_len} tokens; the request has "
                            f"{len(ids)} prompt tokens and asks for {asked if asked is not None else 'at least 1'} "
                            "more", param="max_tokens", code="context_length_exceeded")
    return asked if asked is not None else min(default or room, room)


def _run(st: AppState, request: Request, jobs: list):
    """Submit (ids, SamplingParams) jobs now (errors become HTTP errors before any response
    starts); returns an async iterator of (choice index, Event)."""
    engine = st.engine
    why = batch_problem(len(jobs), engine.config.max_queue)
    if why:
        raise APIError(400, why, param="n")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ids = []
    try:
        for i, (prompt, params) in enumerate(jobs):
            ids.append(engine.submit(prompt, params, _Sink(loop, queue, i)))
    except EngineFull as e:
        for x in ids:
            engine.abort(x)
        raise APIError(503, f"server busy: {e}; retry later", "server_error", code="server_busy") from e
    except (PromptTooLong, ValueError) as e:
        for x in ids:
            engine.abort(x)
        raise APIError(400, str(e), param="prompt") from e
    return _events(st, request, queue, ids)


async def _events(st: AppState, request: Request, queue: asyncio.Queue, ids: list[int]):
    st.metrics.requests += len(ids)
    timeout = st.request_timeout
    left, deadline, next_check = len(ids), time.monotonic() + timeout, 0.0
    try:
        while left:
            # Checked on every event, not only when the queue is idle: a request that keeps
            # producing tokens must still time out, and a non-streamed one notice its client leaving.
            now = time.monotonic()
            if now > deadline:
                raise APIError(504, f"request timed out after {timeout:g} s", "server_error")
            if now >= next_check:
                next_check = now + 0.25
                if await request.is_disconnected():
                    return
            try:  # a waiting event needs no timer task; only an empty queue is waited on
                i, ev = queue.get_nowait() if not queue.empty() else \
                    await asyncio.wait_for(queue.get(), timeout=min(0.25, deadline - now))
            except asyncio.TimeoutError:
                continue
            if ev.finish_reason == "error":
                raise APIError(500, "the engine failed while running this request", "server_error")
            if ev.finish_reason:
                left -= 1
            yield i, ev
    finally:
        for x in ids:  # no-op for finished sequences; frees the others
            st.engine.abort(x)


class _Sink:
    """Where the engine sends one choice's events: the request's queue, on its event loop."""

    __slots__ = ("loop", "queue", "index")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def __call__(self, ev) -> None:  # from the engine thread, one event
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, ev))


def _deliver(batch: list) -> None:
    """Engine.deliver: a step's events, one wake-up per event loop for all of them."""
    by_loop: dict = {}
    for emit, ev in batch:
        if isinstance(emit, _Sink):
            by_loop.setdefault(emit.loop, []).append((emit, ev))
        else:
            emit(ev)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that event loop has closed: nobody is waiting for these events
            pass


def _put_all(items: list) -> None:  # on the event loop
    for sink, ev in items:
        sink.queue.put_nowait((sink.index, ev))


def _sampling(req, max_tokens: int, logprobs, choice: int):
    try:
        return req.sampling(max_tokens, logprobs, choice)
    except ValueError as e:
        raise APIError(400, str(e)) from e
