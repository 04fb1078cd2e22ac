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
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .body import Guard, error_response
from .engine import Engine, EngineFull, PromptTooLong
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest
from .validation import batch_problem, lone_surrogate, sampling_problem


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


_error = error_response


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_request_bytes: int = 1 << 20,
               request_timeout: float = 600.0) -> FastAPI:
    tok = engine.tokenizer
    mc = engine.model.config
    vocab_size = (mc.get_text_config() if hasattr(mc, "get_text_config") else mc).vocab_size
    metrics = Metrics(engine)
    engine.deliver = _deliver

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="llmzip", lifespan=lifespan)
    created = int(time.time())

    app.add_middleware(Guard, api_key=api_key, max_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}" if errs else "invalid request",
                      param=where or None)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llmzip", "max_model_len": engine.config.max_model_len}]}

    def check(req):
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")
        why = req.unsupported()
        if why:
            raise APIError(400, why)
        where = lone_surrogate(req.model_dump())
        if where:
            raise APIError(400, f"{where}: text holds a lone UTF-16 surrogate; send valid Unicode", param=where)
        bad = sampling_problem(req, vocab_size)
        if bad:
            raise APIError(400, bad[0], param=bad[1])

    def prompt_ids(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(x, int) for x in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        out = []
        for p in prompts:
            ids = tok(p).input_ids if isinstance(p, str) else list(p)
            if any(not 0 <= t < len(tok) for t in ids):
                raise APIError(400, "prompt has token ids outside the vocabulary", param="prompt")
            out.append(ids)
        return out

    def limits(ids: list[int], asked: int | None, default: int | None) -> int:
        room = engine.config.max_model_len - len(ids)
        if room < 1 or (asked is not None and asked > room):
            raise APIError(400, f"this model's maximum context length is {engine.config.max_model_len} tokens; "
                                f"the request has {len(ids)} prompt tokens and asks for "
                                f"{asked if asked is not None else 'at least 1'} more", param="max_tokens",
                           code="context_length_exceeded")
        return asked if asked is not None else min(default or room, room)

    def run(request: Request, jobs: list):
        """Submit (ids, SamplingParams) jobs now (errors become HTTP errors before any
        response starts); returns an async iterator of (choice index, Event)."""
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
        return _events(request, queue, ids)

    async def _events(request: Request, queue: asyncio.Queue, ids: list[int]):
        metrics.requests += len(ids)
        left, deadline, next_check = len(ids), time.monotonic() + request_timeout, 0.0
        try:
            while left:
                # Checked on every event, not only when the queue is idle: a request that keeps
                # producing tokens must still time out, and a non-streamed one notice its client leaving.
                now = time.monotonic()
                if now > deadline:
                    raise APIError(504, f"request timed out after {request_timeout:g} s", "server_error")
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
                engine.abort(x)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check(req)
        prompts = prompt_ids(req.prompt)
        jobs = []
        for ids in prompts:
            max_tokens = limits(ids, req.max_tokens, 16)
            for c in range(req.n):
                jobs.append((ids, _sampling(req, max_tokens, req.logprobs, c)))
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return _sse(_stream_chunks(run(request, jobs), rid, "text_completion", req, prompts, False))
        return await _full(run(request, jobs), rid, "text_completion", req, prompts, len(jobs), False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check(req)
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
        max_tokens = limits(ids, req.max_completion_tokens or req.max_tokens, None)
        k = (req.top_logprobs or 0) if req.logprobs else None
        jobs = [(ids, _sampling(req, max_tokens, k, c)) for c in range(req.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return _sse(_stream_chunks(run(request, jobs), rid, "chat.completion.chunk", req, [ids], True))
        return await _full(run(request, jobs), rid, "chat.completion", req, [ids], len(jobs), True)

    def _lp_entry(t: int, lp, chat: bool):
        text = tok.decode([t])
        if chat:
            return {"token": text, "logprob": lp[0], "bytes": list(text.encode()),
                    "top_logprobs": [{"token": tok.decode([a]), "logprob": b, "bytes": list(tok.decode([a]).encode())}
                                     for a, b in lp[1]]}
        return text, lp[0], {tok.decode([a]): b for a, b in lp[1]}

    def _logprobs(tokens, lps, chat: bool, offset: int = 0):
        if not lps:
            return None
        entries = [_lp_entry(t, lp, chat) for t, lp in zip(tokens, lps)]
        if chat:
            return {"content": entries}
        offsets, pos = [], offset
        for text, _, _ in entries:
            offsets.append(pos)
            pos += len(text)
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": offsets}

    async def _full(events, rid, obj, req, prompts, n_jobs, chat: bool):
        texts, toks, lps, finish = [""] * n_jobs, [[] for _ in range(n_jobs)], [[] for _ in range(n_jobs)], [None] * n_jobs
        completion = 0
        async for i, ev in events:
            texts[i] += ev.text
            toks[i] += ev.tokens
            lps[i] += ev.logprobs
            if ev.finish_reason:
                finish[i] = ev.finish_reason
                completion += ev.completion_tokens
        if any(f is None for f in finish):
            return JSONResponse({}, status_code=499)  # the client went away
        choices = []
        for i in range(n_jobs):
            lp = _logprobs(toks[i], lps[i], chat)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": lp, "finish_reason": finish[i]})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finish[i]})
        prompt_tokens = sum(len(p) for p in prompts) * req.n
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    async def _stream_chunks(events, rid, obj, req, prompts, chat: bool):
        created_at, completion, offsets, started = int(time.time()), 0, {}, set()
        usage_wanted = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None):
            body = {"id": rid, "object": obj, "created": created_at, "model": model_name, "choices": choices}
            if usage_wanted:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            async for i, ev in events:
                if ev.finish_reason:
                    completion += ev.completion_tokens
                lp = _logprobs(ev.tokens, ev.logprobs, chat, offsets.get(i, 0))
                offsets[i] = offsets.get(i, 0) + len(ev.text)
                if not (ev.text or ev.finish_reason or lp):
                    continue
                if chat:
                    delta = {"content": ev.text}
                    if i not in started:
                        delta["role"] = "assistant"
                        started.add(i)
                    yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}])
                else:
                    yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
            if usage_wanted:
                p = sum(len(x) for x in prompts) * req.n
                yield chunk([], {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion})
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"

    return app


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


def _sse(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
