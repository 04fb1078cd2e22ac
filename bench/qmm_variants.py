"""GPU: variants of the W4 g128 dequant-matmul, timed side by side on one shape (a tuning aid).

    python bench/qmm_variants.py [--K 8192 --N 8192] [--ms 1,16,64,256,1024]

Variants (each over a small config sweep; the best config is reported):
- `current`: llmzip.kernels.triton_qmm as shipped (autotuned);
- `tile`: one scale (and zero) row per K tile, loaded once as [BLOCK_N], applied to the
  fp32 partial product of the integer codes; packed words indexed per k as today;
- `tile3d`: as `tile`, but each packed word is loaded once ([BLOCK_K / 8, BLOCK_N]) and
  unpacked by broadcasting the 8 shifts, then reshaped to [BLOCK_K, BLOCK_N];
- `gemv`: M = 1 without tensor cores (multiply + sum over K), split-K;
- `dequant+mm`: dequantize to fp16 once per call, then torch.matmul (cuBLAS).
Timing: triton.testing.do_bench (median; it flushes L2 between runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _tile_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, K_CHUNK,
                 stride_xm, stride_wk, stride_sg, stride_os, stride_om,
                 GROUP: tl.constexpr, UNPACK3D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PER: tl.constexpr = 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = pid_k * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if UNPACK3D:
            offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
            word = tl.load(w_ptr + offs_w[:, None] * stride_wk + offs_n[None, :],
                           mask=(offs_w * PER < k_hi)[:, None] & n_ok[None, :], other=0)
            shifts = tl.arange(0, PER) * 4
            u = (word[:, None, :] >> shifts[None, :, None]) & 0xF
            u = tl.reshape(u, (BLOCK_K, BLOCK_N))
        else:
            word = tl.load(w_ptr + (offs_k // PER)[:, None] * stride_wk + offs_n[None, :],
                           mask=k_ok[:, None] & n_ok[None, :], other=0)
            u = (word >> ((offs_k % PER) * 4)[:, None]) & 0xF
        s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=n_ok, other=0.0)
        part = tl.dot(x, (u - 8).to(x.dtype))
        acc += part * s.to(tl.float32)[None, :]
    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, K_CHUNK, stride_wk, stride_sg, stride_os,
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PER: tl.constexpr = 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_lo = pid_k * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
        word = tl.load(w_ptr + offs_w[:, None] * stride_wk + offs_n[None, :],
                       mask=(offs_w * PER < k_hi)[:, None] & n_ok[None, :], other=0)
        shifts = tl.arange(0, PER) * 4
        u = (word[:, None, :] >> shifts[None, :, None]) & 0xF  # [BK/8, 8, BN]
        offs_k = k0 + tl.arange(0, BLOCK_K // PER)[:, None] * PER + tl.arange(0, PER)[None, :]
        x = tl.load(x_ptr + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)  # [BK/8, 8]
        w = (u - 8).to(tl.float32)
        part = tl.sum(tl.sum(x[:, :, None] * w, axis=1), axis=0)
        s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=n_ok, other=0.0)
        acc += part * s.to(tl.float32)
    tl.store(out_ptr + pid_k * stride_os + offs_n, acc, mask=n_ok)


def run_tile(x, qw, sc, cfg, unpack3d, group=128):
    bm, bn, bk, split, warps, stages = cfg
    M, K = x.shape
    N = qw.shape[1]
    per = -(-K // split)
    kc = -(-per // bk) * bk
    split = -(-K // kc)
    out = torch.empty((split, M, N), device=x.device, dtype=x.dtype if split == 1 else torch.float32)
    grid = (-(-M // bm), -(-N // bn), split)
    _tile_kernel[grid](x, qw, sc, out, M, N, K, kc, x.stride(0), qw.stride(0), sc.stride(0), out.stride(0),
                       out.stride(1), GROUP=group, UNPACK3D=unpack3d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                       num_warps=warps, num_stages=stages)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)


def run_gemv(x, qw, sc, cfg, group=128):
    bn, bk, split, warps, stages = cfg
    K = x.shape[1]
    N = qw.shape[1]
    per = -(-K // split)
    kc = -(-per // bk) * bk
    split = -(-K // kc)
    out = torch.empty((split, N), device=x.device, dtype=torch.float32)
    _gemv_kernel[(-(-N // bn), split)](x, qw, sc, out, N, K, kc, qw.stride(0), sc.stride(0), out.stride(0),
                                       GROUP=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out.sum(0, keepdim=True).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--K", type=int, default=8192)
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--ms", default="1,16,64,256,1024")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from kernels_gpu import random_w4

    from llmzip.kernels import triton_qmm
    from llmzip.kernels.reference import dense_weight

    K, N = a.K, a.N
    g = torch.Generator(device="cuda").manual_seed(0)
    layer, _ = random_w4(K, N, g)
    r = triton_qmm.repack(layer)
    dense = dense_weight(layer, torch.float16)
    qw, sc = r.qweight, r.scales
    results = []

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    for M in [int(m) for m in a.ms.split(",")]:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g)
        ref = (x.float() @ dense.float().t())
        fp16 = bench(lambda: torch.matmul(x, dense.t()))
        row = {"M": M, "fp16_us": round(fp16 * 1e3, 2)}

        def check(y):
            return ((y.float() - ref).norm() / ref.norm()).item()

        triton_qmm.qmm(x, r)
        row["current_us"] = round(bench(lambda: triton_qmm.qmm(x, r)) * 1e3, 2)
        if M <= 16:
            cfgs = [(16, bn, bk, sk, w, st) for bn in (64, 128) for bk in (64, 128) for sk in (1, 4, 8, 16)
                    for w, st in ((4, 2), (4, 4), (2, 3))]
        else:
            cfgs = [(bm, bn, bk, 1, w, st) for bm in (64, 128) for bn in (128, 256) for bk in (64, 128)
                    for w, st in ((4, 3), (8, 3), (8, 4))]
        for name, u3 in (("tile", False), ("tile3d", True)):
            best = (float("inf"), None, None)
            for cfg in cfgs:
                try:
                    y = run_tile(x, qw, sc, cfg, u3)
                    err = check(y)
                    if not err < 2e-3:
                        print(f"{name} {cfg} M={M}: rel err {err}", flush=True)
                        continue
                    t = bench(lambda: run_tile(x, qw, sc, cfg, u3))
                except Exception as e:  # noqa: BLE001 - out of resources and the like
                    print(f"{name} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                if t < best[0]:
                    best = (t, cfg, err)
            row[f"{name}_us"] = round(best[0] * 1e3, 2)
            row[f"{name}_cfg"] = best[1]
            row[f"{name}_err"] = best[2]
        if M == 1:
            best = (float("inf"), None, None)
            for cfg in itertools.product((64, 128, 256), (64, 128), (1, 4, 8, 16), (4, 8), (2, 3)):
                try:
                    y = run_gemv(x, qw, sc, cfg)
                    err = check(y)
                    if not err < 2e-3:
                        print(f"gemv {cfg}: rel err {err}", flush=True)
                        continue
                    t = bench(lambda: run_gemv(x, qw, sc, cfg))
                except Exception as e:  # noqa: BLE001
                    print(f"gemv {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                if t < best[0]:
                    best = (t, cfg, err)
            row["gemv_us"], row["gemv_cfg"], row["gemv_err"] = round(best[0] * 1e3, 2), best[1], best[2]
        row["dequant+mm_us"] = round(bench(lambda: torch.matmul(x, dense_weight(layer, torch.float16).t())) * 1e3, 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{torch.cuda.get_device_name()} K={K} N={N}; us (speedup vs fp16)")
    for row in results:
        cells = [f"{k[:-3]} {row[k]} ({row['fp16_us'] / row[k]:.2f}x)" for k in row if k.endswith("_us")]
        print(f"M={row['M']}: " + " | ".join(cells))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
