"""What the CLI and its command handlers share: exit codes, dtype names, JSON output.

Plain Python: `llmzip.cli` imports it before parsing, and `llmzip.commands` without
importing the CLI back."""

from __future__ import annotations

import json

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DTYPES = ("auto", "bfloat16", "float16", "float32")


def torch_dtype(name: str):
    """A --dtype choice as a torch dtype; None for "auto" (the checkpoint's own)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def print_json(obj) -> None:
    print(json.dumps(obj, sort_keys=True))
