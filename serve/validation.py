"""Checks on a request's values that its schema cannot express: they need the model (its
vocabulary) or the engine (its queue), or they look inside every string of the body."""

from __future__ import annotations


def lone_surrogate(value, where: str = "") -> str | None:
    """The path (e.g. "messages.0.content") of the first string in `value` (nested dicts and
    lists) holding a lone UTF-16 surrogate such as "\\ud800", which JSON can escape but no
    tokenizer can encode; None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def sampling_problem(req, vocab_size: int) -> tuple[str, str] | None:
    """(message, param) for a sampling value out of range for this model, or None."""
    if req.top_k > vocab_size:
        return (f"top_k {req.top_k} exceeds the vocabulary size {vocab_size}: use a value up to {vocab_size}, "
                "or 0 or -1 to turn it off", "top_k")
    asked = getattr(req, "logprobs", None)
    top = getattr(req, "top_logprobs", None) if asked is True else asked  # chat: a flag and a count
    if isinstance(top, int) and not isinstance(top, bool) and top > vocab_size:
        return f"{top} top logprobs exceed the vocabulary size {vocab_size}", "logprobs"
    return None


def batch_problem(jobs: int, max_queue: int) -> str | None:
    """Why one request of `jobs` sequences (prompts x n) can never be queued, or None."""
    if jobs > max_queue:
        return (f"the request asks for {jobs} sequences (prompts x n), more than this server ever queues "
                f"({max_queue}, --max-queue): send fewer prompts or a smaller n per request")
    return None
