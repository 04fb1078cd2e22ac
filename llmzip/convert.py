"""`llmzip convert`: a GPTQ or AWQ checkpoint rewritten as compressed-tensors pack-quantized.

The legacy tensors are translated by llmzip.legacy (exact), then saved as llmzip saves
its own checkpoints, so the dequantized weights of the output equal the input's bit for
bit. Scales keep their stored dtype (the model is loaded in the scales' dtype, usually
fp16) so no scale is rounded on the way.

A desc_act GPTQ checkpoint whose groups are not contiguous needs its g_idx: it is written
as `actorder: "group"` with `weight_g_idx` tensors, which llmzip reads but
compressed-tensors >= 0.20 (and so transformers) and vLLM >= 0.32 no longer accept
(bench/results/vllm_load.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import CheckpointError, check_output_dir, load, quantization_config, save
from .legacy import LEGACY_METHODS, LegacyFormatError, read_format
from .quant_linear import QuantLinear

_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def scales_dtype(path: Path) -> torch.dtype:
    """dtype of the first `*.scales` tensor in the checkpoint's safetensors files."""
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                if key.endswith(".scales"):
                    return _DTYPES[fh.get_slice(key).get_dtype()]
    raise CheckpointError(f"{path} holds no '.scales' tensors: not a GPTQ/AWQ checkpoint")


def legacy_config(path: Path) -> dict:
    """The quantization_config of a GPTQ/AWQ checkpoint directory; CheckpointError otherwise."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method not in LEGACY_METHODS:
        what = "already compressed-tensors" if method == "compressed-tensors" else f"quant_method {method or None!r}"
        raise CheckpointError(f"{path}: {what}; `llmzip convert` reads quant_method gptq or awq")
    try:
        read_format(qc)
    except LegacyFormatError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return qc


def convert(src: str | Path, out_dir: str | Path) -> Path:
    """Write the GPTQ/AWQ checkpoint `src` as compressed-tensors to `out_dir`; returns the path."""
    from transformers import AutoTokenizer

    from .api import versions

    src = Path(src).expanduser()
    qc = legacy_config(src)
    check_output_dir(out_dir)
    model = load(src, dtype=scales_dtype(src))
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    first = next(iter(quant.values()))
    ignored = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    new_qc = quantization_config(first.scheme, ignored)
    if first.act_order:  # non-contiguous desc_act groups: keep the g_idx (see module doc)
        new_qc["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError):
        tokenizer = None
    metadata = {
        "format_version": 1,
        "method": f"convert:{qc['quant_method']}",
        "source": str(src),
        "source_quantization_config": qc,
        "versions": versions(),
        "layers": {n: {} for n in quant},
    }
    return save(model, tokenizer, out_dir, new_qc, metadata)
