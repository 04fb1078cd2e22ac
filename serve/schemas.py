"""Request bodies of the OpenAI-compatible API (pydantic), and their sampling parameters.

Fields follow OpenAI's reference; `top_k` and `ignore_eos` are the usual extensions
(vLLM's). Parameters that would change the answer but are not implemented are refused
with a 400 instead of being ignored silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .sampling import SamplingParams

MAX_TOKENS_LIMIT = 1 << 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    # Extra fields are allowed (clients send user, metadata, ...); known ones are strict, as in
    # OpenAI's API: "top_k": "5" or "stream": "yes" is a 400, not a guess (an int stands for a float).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        if self.logit_bias:
            return "logit_bias is not supported"
        return None

    def stops(self) -> tuple[str, ...]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4 or any(not x for x in s):
            raise ValueError("stop takes up to 4 non-empty strings")
        return tuple(s)

    def sampling(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        seed = None if self.seed is None else (self.seed + choice) % (1 << 64)  # as manual_seed maps negatives
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), seed=seed, stop=self.stops(),
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logprobs=logprobs, ignore_eos=self.ignore_eos)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported"
        if self.best_of not in (None, 1, self.n):
            return "best_of is not supported"
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}]
            parts = []
            for p in self.content:
                if p.get("type") != "text":
                    raise ValueError(f"message content of type {p.get('type')!r} is not supported (text only)")
                parts.append(str(p.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    response_format: dict | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format other than text is not supported"
        return super().unsupported()
