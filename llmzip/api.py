"""`llmzip.quantize`: model in, quantized model (and optionally a checkpoint) out."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .algorithms import rtn
from .checkpoint import check_output_dir, quantization_config, save
from .config import QuantConfig
from .models import load_pretrained
from .primitives import dequantize
from .quant_linear import QuantLinear
from .surgery import set_module, targets

log = logging.getLogger("llmzip")


def versions() -> dict[str, str]:
    import compressed_tensors
    import transformers

    return {
        "llmzip": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "python": platform.python_version(),
    }


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig, progress: bool = True) -> dict:
    """Replace every targeted nn.Linear of `model` by a QuantLinear, in place.

    Returns a report: {"quantized": [...], "ignored": [...], "layers": {name: {"rel_err": e}}}
    where rel_err = ||W - dequant(q)||_F / ||W||_F per layer.
    """
    quantized, ignored = targets(model, config)  # validates every layer before any work
    if not quantized:
        raise ValueError("no Linear layer left to quantize: check --ignore")
    layers = {}
    for name in tqdm(quantized, desc=f"{config.method} w{config.weights.bits}", unit="layer", disable=not progress):
        lin = model.get_submodule(name)
        w = lin.weight.data
        res = rtn(w, config.weights, config.clip)
        dq = dequantize(res.q, res.scale, res.zero, config.weights.group_size, torch.float32)
        rel = ((dq - w.float()).norm() / w.float().norm().clamp(min=1e-30)).item()
        layers[name] = {"rel_err": round(rel, 6)}
        set_module(model, name, QuantLinear.from_quantized(lin, res.q, res.scale, res.zero, config.weights, res.g_idx))
        del lin, w
    return {"quantized": quantized, "ignored": ignored, "layers": layers}


def quantize(
    model: str | nn.Module,
    config: QuantConfig,
    output_dir: str | Path | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
):
    """Quantize a model (demo alias, local dir, hub id or a loaded nn.Module).

    Writes a compressed-tensors checkpoint to `output_dir` when given.
    Returns (model, report).
    """
    t0 = time.perf_counter()
    if output_dir is not None:
        check_output_dir(output_dir)
    source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if isinstance(model, str):
        model, tokenizer = load_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
    report = quantize_model(model, config, progress=progress)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if output_dir is not None:
        metadata = {
            "format_version": 1,
            "method": config.method,
            "config": config.to_dict(),
            "source": str(source),
            "versions": versions(),
            "calibration": None,  # RTN uses no data; calibrated methods record a digest
            "layers": report["layers"],
            "quantize_seconds": report["seconds"],
        }
        qc = quantization_config(config.weights, report["ignored"])
        report["output_dir"] = str(save(model, tokenizer, output_dir, qc, metadata))
    return model, report

