"""Writers of GPTQ and AWQ checkpoints, written from the formats' published definitions
(AutoGPTQ's QuantLinear.pack, AutoAWQ's WQLinear_GEMM.from_linear), independently of
llmzip's own packing, for the import tests. Test helpers, not a test module.

Codes are unsigned u in [0, 2^bits) with per-group scale s and zero z; a weight is
(u - z) * s computed in fp16, as the formats' own dequantizers do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble k of a word holds column order_map[k]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def bitstream_pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """u [n, cols] -> int32 [n*bits/32, cols]: element i of each column at bits
    [i*bits, (i+1)*bits) of one LSB-first stream (AutoGPTQ's qweight, incl. 3-bit straddles)."""
    n, cols = u.shape
    words = torch.zeros(n * bits // 32, cols, dtype=torch.int64)
    for i in range(n):
        word, shift = divmod(i * bits, 32)
        v = u[i].to(torch.int64)
        words[word] |= (v << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[word + 1] |= v >> (32 - shift)
    return _to_int32(words)


def awq_pack_cols(u: torch.Tensor) -> torch.Tensor:
    """u [rows, cols] 4-bit -> int32 [rows, cols/8], AutoAWQ GEMM's interleaved order."""
    rows, cols = u.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for k in range(8):
            words[:, c] |= u[:, c * 8 + AWQ_PACK_ORDER[k]].to(torch.int64) << (4 * k)
    return _to_int32(words)


def rtn_unsigned(w: torch.Tensor, bits: int, g_idx: torch.Tensor, groups: int, sym: bool):
    """AutoGPTQ-style min/max RTN: (u [out, in] int64, scale fp16 [out, G], zero int64 [out, G])."""
    maxq = 2**bits - 1
    w = w.float()
    lo = torch.stack([w[:, g_idx == g].amin(1) for g in range(groups)], 1).clamp(max=0)
    hi = torch.stack([w[:, g_idx == g].amax(1) for g in range(groups)], 1).clamp(min=0)
    if sym:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    scale = ((hi - lo) / maxq).clamp(min=1e-5).half()
    zero = torch.full_like(lo, (maxq + 1) // 2, dtype=torch.int64) if sym else torch.round(-lo / scale.float()).long()
    g = g_idx.long()
    u = torch.clamp(torch.round(w / scale.float()[:, g]) + zero[:, g], 0, maxq).long()
    return u, scale, zero


def dense(u, scale, zero, g_idx) -> torch.Tensor:
    g = g_idx.long()
    return (u - zero[:, g]).half() * scale[:, g]


def write_legacy(model, out: Path, method: str, bits: int, group: int, sym: bool = False, desc_act: bool = False,
                 v2: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Quantize every Linear but lm_head of `model` (in place: its weights become the
    dequantized ones, the dense reference) and write a `method` ("gptq"/"awq") checkpoint
    to `out`. Returns {linear name: dense fp16 weight}."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state, ref = {}, {}
    for name, lin in model.named_modules():
        if not isinstance(lin, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        out_f, in_f = lin.weight.shape
        width = in_f if group == -1 else group
        groups = in_f // width
        g_idx = torch.arange(in_f, dtype=torch.int32) // width
        if desc_act:  # groups follow a permutation of the columns, as act-order writes them
            perm = torch.randperm(in_f, generator=gen)
            g_idx = torch.empty(in_f, dtype=torch.int32)
            g_idx[perm] = torch.arange(in_f, dtype=torch.int32) // width
        u, scale, zero = rtn_unsigned(lin.weight.data, bits, g_idx, groups, sym)
        ref[name] = dense(u, scale, zero, g_idx)
        lin.weight.data = ref[name].to(lin.weight.dtype)
        if method == "gptq":
            state[f"{name}.qweight"] = bitstream_pack_rows(u.t(), bits)
            stored = zero if v2 else zero - 1  # GPTQ v1 stores zero - 1, masked to `bits` bits
            state[f"{name}.qzeros"] = bitstream_pack_rows(stored & (2**bits - 1), bits).t().contiguous()
            state[f"{name}.scales"] = scale.t().contiguous()
            state[f"{name}.g_idx"] = g_idx
        else:
            state[f"{name}.qweight"] = awq_pack_cols(u.t().contiguous())
            state[f"{name}.qzeros"] = awq_pack_cols(zero.t().contiguous())
            state[f"{name}.scales"] = scale.t().contiguous()
        if lin.bias is not None:
            state[f"{name}.bias"] = lin.bias.data.half()
    quantized = {n.rsplit(".", 1)[0] for n in state}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] not in quantized and not (tied and k == "lm_head.weight"):
            state[k] = v.contiguous().clone()
    save_file(state, str(out / "model.safetensors"))
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
              "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    else:
        qc = {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm"}
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return ref
