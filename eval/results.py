"""One downstream task's score, as the built-in tasks (eval/tasks.py) and lm-eval
(eval/lmeval.py) both report it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float
    stderr: float
    n: int
    seconds: float
    prompt: str
    tokens: int | None = None  # tokens the model read (prompts + continuations + generated)
    higher_is_better: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = round(self.tokens / self.seconds, 1) if self.tokens and self.seconds else None
        return d
