"""Size report of a checkpoint directory, read from safetensors headers."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .checkpoint import CheckpointError
from .files import open_safetensors, read_json

_COMPONENT = {
    "weight_packed": "packed weights",
    "weight_scale": "scales",
    "weight_zero_point": "zero points",
    "weight_g_idx": "g_idx",
    "weight_shape": "shapes",
    # GPTQ / AWQ checkpoints (llmzip.legacy)
    "qweight": "packed weights",
    "qzeros": "zero points",
    "scales": "scales",
    "g_idx": "g_idx",
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
    cfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    legacy_bits = (cfg.get("quantization_config") or {}).get("bits")  # GPTQ/AWQ: codes per qweight word
    packed_cols: dict[str, int] = {}  # Linear name -> int32 words per row of weight_packed
    linear_shape: dict[str, list[int]] = {}
    for f in files:
        with open_safetensors(f) as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
                suffix = key.rsplit(".", 1)[-1]
                if suffix in _COMPONENT:
                    by_component[_COMPONENT[suffix]] += nbytes
                    if suffix == "weight_packed":
                        packed_cols[key.rsplit(".", 1)[0]] = shape[1]
                    if suffix == "weight_shape":
                        linear_shape[key.rsplit(".", 1)[0]] = fh.get_tensor(key).tolist()
                        n = math.prod(linear_shape[key.rsplit(".", 1)[0]])
                        quant_weights += n
                        bf16_bytes += 2 * n
                    elif suffix == "qweight" and legacy_bits:
                        n = math.prod(shape) * 32 // legacy_bits
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
        meta = read_json(path / "llmzip.json")
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
        "kv_cache": kv_cache_report(path),
        "layer_bits": layer_bits(packed_cols, linear_shape),
    }


def layer_bits(packed_cols: dict[str, int], shapes: dict[str, list[int]]) -> dict[str, int]:
    """{Linear name: code width} of pack-quantized Linears: a row of `in` b-bit codes
    takes ceil(in * b / 32) int32 words, so b = floor(32 * words / in) when in >= 32."""
    return {n: (32 * cols) // shapes[n][1] for n, cols in sorted(packed_cols.items()) if n in shapes}


def bits_summary(r: dict) -> list[str]:
    """Lines of `llmzip info` on the code widths: weights per width and, when the widths
    differ, one row per kind of Linear (q_proj, down_proj, ...) with its width in each layer."""
    bits = r.get("layer_bits") or {}
    if not bits:
        return []
    widths = sorted(set(bits.values()))
    lines = []
    if len(widths) > 1:
        import re

        lines.append(f"  code widths                     {len(widths)} ({', '.join(f'w{b}' for b in widths)}), "
                     f"{len(bits)} Linears:")
        counts = {b: [n for n, v in bits.items() if v == b] for b in widths}
        lines.append("    " + ", ".join(f"w{b}: {len(ns)} Linears" for b, ns in counts.items()))
        rows: dict[str, dict[int, int]] = {}
        for n, b in bits.items():
            m = re.search(r"\.(\d+)\.(.+)$", n)
            if m:
                kind = re.sub(r"\.\d+\.", ".*.", m.group(2))
                rows.setdefault(kind, {}).setdefault(int(m.group(1)), b)
        for kind, per_layer in rows.items():
            lines.append(f"    {kind:<28} " + "".join(str(per_layer.get(i, "-"))
                                                     for i in range(max(per_layer) + 1)) + "  (bits by layer)")
    return lines


def kv_cache_report(path: Path) -> dict | None:
    """KV-cache bytes per token (all layers) in bf16 and in each llmzip KV scheme, from
    config.json's attention shape; None when the config does not say."""
    from .kv_schemes import QUANTIZED, SCHEMES

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    cfg = read_json(cfg_file)
    cfg = cfg.get("text_config", cfg)
    layers, heads = cfg.get("num_hidden_layers"), cfg.get("num_attention_heads")
    if not layers or not heads or not cfg.get("hidden_size"):
        return None
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_layer = {"bf16": SCHEMES["auto"].bytes_per_token(kv_heads, head_dim)}
    per_layer.update({d: SCHEMES[d].bytes_per_token(kv_heads, head_dim) for d in QUANTIZED})
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "bytes_per_token": {k: round(v * layers, 1) for k, v in per_layer.items()},
            "note": "all layers, K and V; int4/int2: group 32, the residual window of full-precision tokens excluded"}


def format_report(r: dict) -> str:
    lines = [f"{r['path']}  ({r.get('method') or 'unknown method'})"]
    for name, b in r["components"].items():
        lines.append(f"  {name:<30} {b / 2**20:10.2f} MiB")
    lines.append(f"  {'total tensors':<30} {r['tensor_bytes'] / 2**20:10.2f} MiB")
    if r["bits_per_weight"] is not None:
        lines.append(f"  bits per quantized weight       {r['bits_per_weight']:.3f} (codes + scales + zeros)")
        lines += bits_summary(r)
    lines.append(f"  size vs bf16                    {r['ratio_to_bf16']:.3f}x ({r['bf16_bytes'] / 2**20:.2f} MiB in bf16)")
    kv = r.get("kv_cache")
    if kv:
        b = kv["bytes_per_token"]
        lines.append("  KV cache bytes per token        " + ", ".join(
            f"{k} {v / 1024:.1f} KiB" + ("" if k == "bf16" else f" ({v / b['bf16']:.3f}x)") for k, v in b.items()))
    return "\n".join(lines)


def kernel_report(path, device=None) -> dict:
    """Load the checkpoint on `device` and return {"device", "layers": {name: {"kernel",
    "refused", "runs"}}} as bound by the kernel registry ("runs": {activation dtype: the
    variant that runs, by rows}, for kernels that choose one per call)."""
    import torch

    from .checkpoint import load
    from .kernels import registry

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(path, device=device)  # chooses (and prepares) each layer's kernel
    return {"device": str(device), "layers": registry.choices(model)}


def format_kernel_report(report: dict) -> str:
    """One line per (kernel, refusals) combination, with its layer count and an example."""
    groups: dict = {}
    for name, v in report["layers"].items():
        key = (v["kernel"], tuple(sorted(v["refused"].items())), tuple(v.get("runs", {}).items()))
        groups.setdefault(key, []).append(name)
    lines = [f"kernels on {report['device']}:"]
    for (kernel, refused, runs), names in groups.items():
        lines.append(f"  {kernel}: {len(names)} layers (e.g. {names[0]})")
        lines += [f"    {dtype} activations run {what}" for dtype, what in runs]
        lines += [f"    {k} refused: {reason}" for k, reason in refused]
    return "\n".join(lines)
