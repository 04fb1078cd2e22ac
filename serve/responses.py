"""OpenAI response bodies from the engine's events: whole responses, server-sent event
chunks, and logprobs in the completions and the chat shapes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


@dataclass
class Reply:
    """What a response needs besides its events."""

    rid: str  # response id
    obj: str  # OpenAI object name
    model: str  # served model name
    n: int  # choices per prompt
    prompts: list[list[int]]
    chat: bool
    tokenizer: object

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) * self.n


def logprobs(reply: Reply, tokens: list[int], lps: list, offset: int = 0):
    """The `logprobs` field for `tokens` with their (logprob, top) pairs; None without any."""
    if not lps:
        return None
    tok = reply.tokenizer
    if reply.chat:
        def entry(t, lp):
            text = tok.decode([t])
            return {"token": text, "logprob": lp[0], "bytes": list(text.encode()),
                    "top_logprobs": [{"token": tok.decode([a]), "logprob": b, "bytes": list(tok.decode([a]).encode())}
                                     for a, b in lp[1]]}
        return {"content": [entry(t, lp) for t, lp in zip(tokens, lps)]}
    pairs = list(zip(tokens, lps))
    texts = [tok.decode([t]) for t, _ in pairs]
    offsets, pos = [], offset
    for text in texts:
        offsets.append(pos)
        pos += len(text)
    return {"tokens": texts, "token_logprobs": [lp[0] for _, lp in pairs],
            "top_logprobs": [{tok.decode([a]): b for a, b in lp[1]} for _, lp in pairs], "text_offset": offsets}


async def whole(events, reply: Reply, n_jobs: int):
    """The non-streamed response body, or None when the client went away first."""
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
        return None
    choices = []
    for i in range(n_jobs):
        lp = logprobs(reply, toks[i], lps[i])
        if reply.chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                            "logprobs": lp, "finish_reason": finish[i]})
        else:
            choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finish[i]})
    p = reply.prompt_tokens
    return {"id": reply.rid, "object": reply.obj, "created": int(time.time()), "model": reply.model,
            "choices": choices, "usage": {"prompt_tokens": p, "completion_tokens": completion,
                                          "total_tokens": p + completion}}


async def chunks(events, reply: Reply, include_usage: bool):
    """Server-sent events: a chunk per event with text, logprobs or an end, optionally a
    usage chunk, then [DONE]; an error event instead when the request fails mid-stream."""
    created_at, completion, offsets, started = int(time.time()), 0, {}, set()

    def chunk(choices, usage=None):
        body = {"id": reply.rid, "object": reply.obj, "created": created_at, "model": reply.model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        async for i, ev in events:
            if ev.finish_reason:
                completion += ev.completion_tokens
            lp = logprobs(reply, ev.tokens, ev.logprobs, offsets.get(i, 0))
            offsets[i] = offsets.get(i, 0) + len(ev.text)
            if not (ev.text or ev.finish_reason or lp):
                continue
            if reply.chat:
                delta = {"content": ev.text}
                if i not in started:
                    delta["role"] = "assistant"
                    started.add(i)
                yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}])
            else:
                yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
        if include_usage:
            p = reply.prompt_tokens
            yield chunk([], {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion})
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"
