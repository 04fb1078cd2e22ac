"""Size report of a checkpoint directory, read from safetensors headers."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open

from .checkpoint import CheckpointError

_COMPONENT = {
    "weight_packed": "packed weights",
    "weight_scale": "scales",
    "weight_zero_point": "zero points",
    "weight_g_idx": "g_idx",
    "weight_shape": "shapes",
}
_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


def size_report(path: str | Path) -> dict:
    """Bytes per component, bits per quantized weight (codes + scales + zeros + g_idx),
    and the ratio of all tensor bytes to the same model stored entirely in bf16."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors files")
    by_component: dict[str, int] = defaultdict(int)
    quant_weights = 0  # elements of quantized weight matrices
    bf16_bytes = 0  # the same tensors, dense, in bf16
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
                suffix = key.rsplit(".", 1)[-1]
                if suffix in _COMPONENT:
                    by_component[_COMPONENT[suffix]] += nbytes
                    if suffix == "weight_shape":
                        n = math.prod(fh.get_tensor(key).tolist())
                        quant_weights += n
                        bf16_bytes += 2 * n
                else:
                    part = "embeddings" if "embed" in key else "other full-precision tensors"
                    by_component[part] += nbytes
                    bf16_bytes += 2 * math.prod(shape)
    quant_bytes = sum(by_component[c] for c in ("packed weights", "scales", "zero points", "g_idx", "shapes"))
    tensor_bytes = sum(by_component.values())
    meta = {}
    if (path / "llmzip.json").is_file():
        meta = json.loads((path / "llmzip.json").read_text())
    return {
        "path": str(path),
        "files_bytes": sum(f.stat().st_size for f in files),
        "tensor_bytes": tensor_bytes,
        "components": dict(sorted(by_component.items())),
        "quantized_weights": quant_weights,
        "bits_per_weight": round(8 * quant_bytes / quant_weights, 4) if quant_weights else None,
        "bf16_bytes": bf16_bytes,
        "ratio_to_bf16": round(tensor_bytes / bf16_bytes, 4),
        "method": meta.get("method"),
        "config": meta.get("config"),
    }


def format_report(r: dict) -> str:
    lines = [f"{r['path']}  ({r.get('method') or 'unknown method'})"]
    for name, b in r["components"].items():
        lines.append(f"  {name:<30} {b / 2**20:10.2f} MiB")
    lines.append(f"  {'total tensors':<30} {r['tensor_bytes'] / 2**20:10.2f} MiB")
    if r["bits_per_weight"] is not None:
        lines.append(f"  bits per quantized weight       {r['bits_per_weight']:.3f} (codes + scales + zeros)")
    lines.append(f"  size vs bf16                    {r['ratio_to_bf16']:.3f}x ({r['bf16_bytes'] / 2**20:.2f} MiB in bf16)")
    return "\n".join(lines)
