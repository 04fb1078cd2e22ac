"""Decode attention that reads the serving engine's paged INT8 KV pool directly.

One new query token per sequence attends to that sequence's cached keys and values,
dequantized in registers page by page: no full-precision copy of the cache is ever
written. Layout (serve/kv_pool.py, kv_dtype="int8"):
- codes uint8 [pages, kv_heads, PAGE, D]; scale fp16 and zero point uint8, each
  [pages, kv_heads, PAGE, 1], per token and head, so k = (code - zero) * scale
  (llmzip.kv_cache's INT8 scheme);
- block table int32/int64 [B, max_pages] (page ids, in order), lengths [B] (tokens).
Grouped-query attention: query head h reads kv head h // (Hq / Hkv).
Softmax is computed online (running max and sum) in fp32; the output is the query dtype.

`decode_attention_reference` is the plain-torch ground truth (gather, dequantize, softmax).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None


def decode_attention_reference(q, k_codes, k_params, v_codes, v_params, table, lengths, scale=None):
    """q [B, Hq, D]; k/v codes [P, Hkv, PAGE, D] uint8; k/v params (scale, zero) each
    [P, Hkv, PAGE, 1]; table [B, n]; lengths [B]. Returns [B, Hq, D] in q's dtype."""
    B, Hq, D = q.shape
    Hkv, page = k_codes.shape[1], k_codes.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for b in range(B):
        n = int(lengths[b])
        pages = table[b, : -(-n // page)].long()

        def deq(codes, params):
            x = (codes[pages].float() - params[1][pages].float()) * params[0][pages].float()  # [p, Hkv, PAGE, D]
            return x.permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :n]

        k, v = deq(k_codes, k_params), deq(v_codes, v_params)
        k = k.repeat_interleave(Hq // Hkv, 0)
        v = v.repeat_interleave(Hq // Hkv, 0)
        att = torch.softmax((q[b].float()[:, None, :] * k).sum(-1) * scale, -1)  # [Hq, n]
        out[b] = (att[:, :, None] * v).sum(1).to(q.dtype)
    return out


if triton is not None:

    @triton.jit
    def _decode_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, tab_ptr, len_ptr, out_ptr,
                       sm_scale, stride_qb, stride_qh, stride_cp, stride_ch, stride_ct, stride_pp, stride_ph,
                       stride_tb, stride_ob, stride_oh,
                       GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        t = tl.arange(0, PAGE)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=dmask, other=0.0).to(tl.float32)
        n = tl.load(len_ptr + b)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p in range(0, tl.cdiv(n, PAGE)):
            page = tl.load(tab_ptr + b * stride_tb + p).to(tl.int64)
            tok = p * PAGE + t
            valid = tok < n
            base = page * stride_cp + kvh * stride_ch
            pbase = page * stride_pp + kvh * stride_ph
            offs = base + t[:, None] * stride_ct + d[None, :]
            m2 = valid[:, None] & dmask[None, :]
            k = tl.load(kc_ptr + offs, mask=m2, other=0).to(tl.float32)
            k = (k - tl.load(kz_ptr + pbase + t, mask=valid, other=0).to(tl.float32)[:, None]) \
                * tl.load(ks_ptr + pbase + t, mask=valid, other=0.0).to(tl.float32)[:, None]
            s = tl.sum(k * q[None, :], axis=1) * sm_scale
            s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            w = tl.exp(s - m_new)
            v = tl.load(vc_ptr + offs, mask=m2, other=0).to(tl.float32)
            v = (v - tl.load(vz_ptr + pbase + t, mask=valid, other=0).to(tl.float32)[:, None]) \
                * tl.load(vs_ptr + pbase + t, mask=valid, other=0.0).to(tl.float32)[:, None]
            acc = acc * alpha + tl.sum(w[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(w, axis=0)
            m_i = m_new
        o = acc / l_i
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=dmask)


def decode_attention(q, k_codes, k_params, v_codes, v_params, table, lengths, scale=None):
    """Triton version of `decode_attention_reference` (same arguments and result)."""
    if triton is None:
        raise ImportError("triton is not installed: pip install 'llmzip[kernels]'")
    B, Hq, D = q.shape
    P, Hkv, page, _ = k_codes.shape
    if page & (page - 1) or Hq % Hkv:
        raise ValueError("page size must be a power of two and query heads a multiple of KV heads")
    for t in (k_codes, v_codes, *k_params, *v_params):
        if not t.is_contiguous():
            raise ValueError("the pool tensors must be contiguous")
    q = q.contiguous()
    out = torch.empty_like(q)
    table = table.contiguous()
    lengths = lengths.to(torch.int32).contiguous()
    _decode_kernel[(B, Hq)](
        q, k_codes, k_params[0], k_params[1], v_codes, v_params[0], v_params[1], table, lengths, out,
        scale if scale is not None else 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        k_params[0].stride(0), k_params[0].stride(1), table.stride(0), out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, PAGE=page, D=D, BLOCK_D=triton.next_power_of_2(D))
    return out
