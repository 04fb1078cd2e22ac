"""Greedy tokens and first-step logprobs of one checkpoint in vLLM (run in the vllmcpu venv).

    python bench/vllm_side.py JOB.json OUT.json

JOB: {"model": dir, "prompts": [[ids...]], "new_tokens": N, "logprobs": K, "kv_cache_dtype": "auto"|"fp8",
"reference_wna16": bool}.
OUT: {"vllm": version, "greedy": [[ids]], "first_logprobs": [{token id: logprob}], "wna16_gemm": ...} or
{"error": "..."}.
Used by bench/vllm_load.py, one process per checkpoint.

reference_wna16: vLLM's CPU int4 GEMM (`torch.ops._C.cpu_gemm_wna16`) is compiled only into its
AVX-512 builds. Where the op is missing, this runs vLLM with `reference_cpu_gemm_wna16` below in
its place: everything else (config parsing, scheme matching, weight loading, vLLM's own repacking
of the weights) is vLLM's, and only the matmul over the repacked tensors is ours.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

# The engine in this process, so that an error raised in the model's forward (rather than
# "engine core failed to start") is what gets recorded.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def reference_cpu_gemm_wna16(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
    """What vLLM's cpu_gemm_wna16 computes (4-bit codes), over the layout its
    CPUWNA16LinearKernel writes: q_weight [N/16, 2K] int32, for each block of 16 output channels
    and each input row k two words of 8 codes (code i of a word in bits 4i); scales [G, N];
    zeros None (codes are offset by 8) or [G, N/8] int32 packed the same way along N. Each
    weight is dequantized in fp32, (code - zero) * scale, rounded to the activations' dtype, and
    the products are summed in fp32, as the C++ kernel does."""
    import torch

    assert pack_factor == 8, "4-bit codes only, as the C++ op"
    n, k = q_weight.shape[0] * 16, q_weight.shape[1] * pack_factor // 16
    groups = scales.shape[0]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)

    def nibbles(words):  # [..., W] int32 -> [..., W * 8] codes 0..15
        return ((words.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)

    words = q_weight.view(n // 16, k, 2).permute(1, 0, 2).reshape(k, n // 8)
    codes = nibbles(words).float()
    zero = 8.0 if zeros is None else nibbles(zeros.contiguous()).float().repeat_interleave(k // groups, 0)
    weight = ((codes - zero) * scales.float().repeat_interleave(k // groups, 0)).to(input.dtype)
    out = input.reshape(-1, k).float() @ weight.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(input.dtype).reshape(*input.shape[:-1], n)


def _use_reference_wna16() -> dict:
    """Put the reference in place of vLLM's cpu_gemm_wna16 where its build lacks the op; count calls."""
    import torch
    from vllm import _custom_ops

    calls = {"native_op": hasattr(torch.ops._C, "cpu_gemm_wna16"), "reference_calls": 0}
    if not calls["native_op"]:
        def counted(**kw):
            calls["reference_calls"] += 1
            return reference_cpu_gemm_wna16(**kw)

        _custom_ops.cpu_gemm_wna16 = counted
    return calls


def main() -> None:
    job = json.load(open(sys.argv[1]))
    out: dict = {}
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        out["vllm"] = vllm.__version__
        if job.get("reference_wna16"):
            out["wna16_gemm"] = _use_reference_wna16()
        llm = LLM(model=job["model"], dtype="bfloat16", max_model_len=512, enforce_eager=True,
                  kv_cache_dtype=job.get("kv_cache_dtype", "auto"), seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], logprobs=job["logprobs"])
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params)
        out["greedy"] = [list(r.outputs[0].token_ids) for r in res]
        out["first_logprobs"] = [{str(k): v.logprob for k, v in r.outputs[0].logprobs[0].items()} for r in res]
    except Exception as e:  # recorded per kind, not raised: one failing kind must not hide the others
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        out["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
