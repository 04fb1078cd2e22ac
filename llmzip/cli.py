"""The `llmzip` command line.

Exit codes: 0 success; 1 a quality threshold was exceeded (compare); 2 bad input
(arguments, model, data, output directory) with a one-line message; 3 an unexpected
internal error (traceback shown); 130 interrupted.
Commands that produce numbers print, with --json, one JSON object as the last line
of stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

ACT_HELP = ("activations of the quantized layers: fp16 (the model dtype as is) or fp8 (opt-in W4A8: per-token "
            "e4m3 on FP8 tensor cores on GPUs that have them, emulated in torch elsewhere), or fp8-except=NAMES: "
            "fp8 but the Linears of those names keep 16-bit inputs (e.g. fp8-except=gate_proj,up_proj, the MLP's "
            "input, which costs SmolLM2 most of fp8's perplexity); default: fp16")
# config, console, kv_schemes and recipes are light (dataclasses only): safe to import before parsing
from . import kv_schemes  # noqa: E402
from .console import (DTYPES, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK,  # noqa: E402,F401
                      EXIT_REGRESSION, print_json)
from .config import METHODS, SIGNROUND_LOSSES, SIGNROUND_TARGETS, parse_activations  # noqa: E402
from .recipes import RECIPES  # noqa: E402


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated integers, e.g. 2,3,4,8") from None


def _activations(text: str) -> str:
    try:
        parse_activations(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _group_size(text: str) -> int | None | str:
    """'auto' -> 'auto'; '-1' -> None (per-channel); a positive integer -> itself."""
    if text == "auto":
        return "auto"
    try:
        g = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'auto', got {text!r}") from None
    if g == -1:
        return None
    if g <= 0:
        raise argparse.ArgumentTypeError(f"group size {g} must be positive, or -1 for per-channel")
    return g


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmzip",
        description="Quantize, evaluate and inspect Hugging Face causal LMs.",
        epilog="Models: a demo alias (smollm2-135m), a local directory or a hub id (org/name).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model and write a compressed-tensors checkpoint")
    q.add_argument("model", help="demo alias, local model dir or hub id")
    q.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    q.add_argument("--method", default=None, choices=METHODS,
                   help="rtn (no data), or calibrated: gptq, awq, awq+gptq, signround (learned rounding), "
                        "awq+signround (default: rtn)")
    q.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="a preset instead of --method: " + "; ".join(f"{k}: {v['doc']}" for k, v in RECIPES.items()))
    q.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default: 4)")
    q.add_argument("--group-size", type=_group_size, default="auto",
                   help="columns per scale; -1 = per-channel; auto = 128 where it divides every quantized layer's "
                        "input features, else the largest of 64/32 that does (logged). An explicit size that "
                        "does not divide a layer is an error (default: auto)")
    q.add_argument("--asym", action="store_true", help="asymmetric (zero point) instead of symmetric")
    q.add_argument("--avg-bits", type=float, default=None,
                   help="mixed precision: a budget of bits per quantized weight, scales counted as `llmzip info` "
                        "counts them (e.g. 3.75); each layer gets one of --bits-choices by its measured "
                        "sensitivity on the calibration text (--bits is then unused)")
    q.add_argument("--bits-choices", type=_bits_list, default=(2, 3, 4, 8),
                   help="widths --avg-bits chooses from, comma-separated (default: 2,3,4,8)")
    q.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="search clipped ranges per group (default: on for gptq, where the error is the layer "
                        "output's; off for rtn, where it is the weights'; AWQ methods have their own)")
    q.add_argument("--clip-grid", type=int, default=20, help="shrink ratios tried by --clip-search (default: 20)")
    q.add_argument("--ignore", action="append", default=None, metavar="REGEX",
                   help="keep matching Linear layers in full precision (repeatable; default: lm_head)")
    c = q.add_argument_group("calibration (gptq, awq, signround and their combinations)")
    c.add_argument("--calib", default="lee", help="built-in corpus (lee), text file or hub:ID[:CONFIG]:SPLIT:COLUMN")
    c.add_argument("--samples", type=int, default=128, help="calibration sequences (default: 128)")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    c.add_argument("--seed", type=int, default=0, help="seed for picking calibration windows (default: 0)")
    c.add_argument("--chat", action="store_true",
                   help="render samples with the tokenizer's chat template: conversations from a column of "
                        "{role, content} lists (data.jsonl:messages), or user/assistant turns made of a text's lines")
    c.add_argument("--true-sequential", action="store_true",
                   help="GPTQ: quantize each layer's Linears group by group (q/k/v, o, gate/up, down), each "
                        "calibrated with the earlier groups already quantized (one extra pass per group)")
    c.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (groups stay contiguous)")
    c.add_argument("--scale-refit", type=int, default=0, metavar="N",
                   help="GPTQ: N rounds of refitting the scales by least squares on the layer-output error for "
                        "the codes chosen, then rounding again onto them (each round about one more GPTQ solve; "
                        "default: 0)")
    c.add_argument("--iters", type=int, default=None,
                   help="SignRound: signed-gradient steps per decoder layer (default: 200, AutoRound's recipe)")
    c.add_argument("--signround-lr", type=float, default=None,
                   help="SignRound: the first step's size, decaying linearly to 0 (default: 1 / --iters, AutoRound's; "
                        "its light recipe takes 5e-3 at 50 steps)")
    c.add_argument("--signround-batch", type=int, default=None,
                   help="SignRound: calibration samples per step (default: 8, AutoRound's recipe)")
    c.add_argument("--signround-loss", default=None, choices=SIGNROUND_LOSSES,
                   help="SignRound: the block-output loss fitted: mse over every element (default, AutoRound's), "
                        "or relative: each token's squared error over its float output's squared norm, as the "
                        "next layer's RMSNorm sees it (massive-activation tokens do not dominate)")
    c.add_argument("--signround-target", default=None, choices=SIGNROUND_TARGETS,
                   help="SignRound: what each layer is fitted to: model, the float model's own hidden states "
                        "(default, AutoRound's; each layer also makes up for the earlier layers' error), or layer, "
                        "the float layer's output on the same quantized inputs")
    c.add_argument("--tune-epochs", type=int, default=None, metavar="N",
                   help="after the layer-by-layer calibration, N passes of end-to-end tuning of every group scale "
                        "(codes fixed) to the float model's next-token distribution on the calibration tokens "
                        "(default: 0, off; holds the whole model and one batch's logits in memory)")
    c.add_argument("--tune-lr", type=float, default=None,
                   help="--tune-epochs: Adam's step size on each scale's log gain, cosine-decayed (default: 1e-2 for Linears "
                        "below 4 bits, 3e-3 from 4 bits up)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer")
    c.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean diag(H) (default: 0.01)")
    q.add_argument("--rotate", default=None, choices=["hadamard"],
                   help="fold a seeded random Hadamard rotation of the residual stream and of each head's values "
                        "into the float weights first (same function, fewer weight outliers; plain checkpoint)")
    q.add_argument("--rotate-seed", type=int, default=0, help="seed of --rotate's random signs (default: 0)")
    q.add_argument("--kv-cache-dtype", "--kv-cache", dest="kv_cache", default=None, choices=kv_schemes.CALIBRATED,
                   help="also calibrate static FP8 K/V-cache scales on the calibration data and export them "
                        "(compressed-tensors kv_cache_scheme; vLLM --kv-cache-dtype fp8, llmzip serve/eval use them)")
    q.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "gguf"],
                   help="output: a compressed-tensors directory, or a GGUF file for llama.cpp (W4 g32 -> Q4_0/Q4_1, "
                        "W8 g32 sym -> Q8_0; -o names the .gguf file) (default: compressed-tensors)")
    q.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype to load the model in (default: auto)")
    q.add_argument("--load-whole-model", action="store_true",
                   help="load the full-precision model into memory first, instead of reading each layer from disk "
                        "just before it is quantized (same result, more memory)")
    q.add_argument("--device", default=None, help="where the quantization math runs (default: cuda if available, else cpu)")
    q.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    q.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    ppl = esub.add_parser("ppl", help="perplexity on a text (protocol in eval/perplexity.py)")
    ppl.add_argument("model", help="llmzip checkpoint, demo alias, local model dir or hub id")
    ppl.add_argument("--data", default="wiki", help="built-in corpus (wiki), text file, or hub:ID[:CONFIG]:SPLIT:COLUMN")
    ppl.add_argument("--ctx", type=int, default=2048, help="tokens per window (default: 2048)")
    ppl.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: ctx, no overlap)")
    ppl.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    ppl.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    ppl.add_argument("--kv-cache-dtype", "--kv-cache", dest="kv_cache", default=None, choices=kv_schemes.QUANTIZED,
                     help="read keys/values back through a quantized KV cache (llmzip/kv_cache.py): "
                          + kv_schemes.choices_help())
    ppl.add_argument("--kv-residual", type=int, default=128,
                     help="int4/int2: newest tokens kept in full precision (default: 128)")
    ppl.add_argument("--kv-group", type=int, default=32,
                     help="int4/int2: tokens per key group / channels per value group (default: 32)")
    ppl.add_argument("--kv-chunk", type=int, default=16,
                     help="tokens per forward pass with --kv-cache-dtype; 1 = token-by-token decoding (default: 16)")
    ppl.add_argument("--activations", default="fp16", type=_activations, help=ACT_HELP)
    ppl.add_argument("--json", action="store_true", help="print the result as JSON on the last line")

    t = esub.add_parser("tasks", help="downstream tasks: built-in offline ones (eval/tasks.py) or any lm-eval task")
    t.add_argument("model", help="llmzip checkpoint, demo alias, local model dir or hub id")
    t.add_argument("--tasks", default="wiki_cloze,gpqa_diamond",
                   help="comma-separated: built-in wiki_cloze, gpqa_diamond, gsm8k, or lm-eval task names "
                        "(eval extra) (default: wiki_cloze,gpqa_diamond)")
    t.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    t.add_argument("--batch-size", type=int, default=1, help="requests per forward pass (default: 1)")
    t.add_argument("--include-path", default=None, help="directory of local lm-eval task YAMLs")
    t.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    t.add_argument("--json", action="store_true", help="print the results as JSON on the last line")

    k = esub.add_parser("kld", help="KL divergence and top-1 agreement against a base model (eval/kld.py)")
    k.add_argument("base", help="the reference model: demo alias, model dir, hub id or llmzip checkpoint")
    k.add_argument("model", help="the model compared with it (usually a quantized checkpoint)")
    k.add_argument("--data", default="wiki", help="built-in corpus (wiki), text file, or hub:ID[:CONFIG]:SPLIT:COLUMN")
    k.add_argument("--ctx", type=int, default=2048, help="tokens per window (default: 2048)")
    k.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    k.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (default: each checkpoint's)")
    k.add_argument("--json", action="store_true", help="print the result as JSON on the last line")

    c = sub.add_parser("compare", help="quality of checkpoints vs their base model: report + CI verdict (exit 1)",
                       description="Perplexity, KL divergence and top-1 agreement of each MODEL against BASE "
                                   "on one text, and optionally downstream task scores; writes report.md/report.json/plots to --report and exits 1 when "
                                   "a model breaks a threshold.")
    c.add_argument("base", help="the reference model (demo alias, model dir, hub id)")
    c.add_argument("models", nargs="+", help="checkpoints to compare with it")
    c.add_argument("--ppl", "--data", dest="data", default="wiki",
                   help="text for perplexity and KLD: built-in corpus (wiki), text file, or hub:ID[:CONFIG]:SPLIT:COLUMN")
    c.add_argument("--ctx", type=int, default=2048, help="tokens per window (default: 2048)")
    c.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    c.add_argument("--max-ppl-increase", default=None, help="fail above this perplexity increase, e.g. 2%% or 0.02")
    c.add_argument("--max-kld", type=float, default=None, help="fail above this mean KL divergence (nats)")
    c.add_argument("--tasks", default=None, help="also run these tasks (as in `eval tasks`) on base and models")
    c.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    c.add_argument("--batch-size", type=int, default=1, help="task requests per forward pass (default: 1)")
    c.add_argument("--include-path", default=None, help="directory of local lm-eval task YAMLs")
    c.add_argument("--max-acc-drop", type=float, default=None,
                   help="fail when a task's score drops more than this many points (0-100 scale) below the base")
    c.add_argument("--report", default="llmzip-report", help="report directory (default: ./llmzip-report)")
    c.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (default: each checkpoint's)")
    c.add_argument("--json", action="store_true", help="print report.json's summary as the last line")

    x = sub.add_parser("export", help="write a quantized checkpoint in another format (gguf, for llama.cpp)",
                       description="Write an llmzip (or GPTQ/AWQ) checkpoint as a GGUF file: W4 g32 sym -> Q4_0, "
                                   "W4 g32 asym -> Q4_1, W8 g32 sym -> Q8_0, with no requantization; other schemes "
                                   "are refused with the nearest exact one.")
    x.add_argument("model", help="quantized checkpoint directory")
    x.add_argument("--format", required=True, choices=["gguf"], help="output format")
    x.add_argument("-o", "--output", required=True, help="output file (model.gguf)")
    x.add_argument("--json", action="store_true", help="print the export report as JSON on the last line")

    cv = sub.add_parser("convert", help="rewrite an AutoGPTQ/GPTQModel or AutoAWQ (GEMM) checkpoint as compressed-tensors",
                        description="Read a quant_method gptq or awq checkpoint and write it as compressed-tensors "
                                    "pack-quantized, bit-exact in the dequantized weights.")
    cv.add_argument("model", help="GPTQ or AWQ checkpoint directory")
    cv.add_argument("-o", "--output", required=True, help="output checkpoint directory")

    i = sub.add_parser("info", help="size report of a checkpoint")
    i.add_argument("path", help="checkpoint directory")
    i.add_argument("--kernels", action="store_true",
                   help="load the checkpoint and show which kernel runs each layer, and why others refused")
    i.add_argument("--device", default=None, help="device for --kernels (default: cuda if available, else cpu)")
    i.add_argument("--json", action="store_true", help="print the report as JSON on the last line")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a (compressed) model",
                       description="Serve /v1/completions, /v1/chat/completions (streaming too), /v1/models, "
                                   "/health and /metrics with continuous batching over a paged KV cache.")
    s.add_argument("model_dir", help="llmzip checkpoint, local model dir, demo alias or hub id")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", default=os.environ.get("LLMZIP_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
                        "$LLMZIP_API_KEY, else none; set the variable instead of this option to keep the key "
                        "out of the process list)")
    s.add_argument("--served-model-name", default=None, help="model id clients use (default: the directory name)")
    s.add_argument("--max-num-seqs", type=int, default=16, help="sequences in the running batch (default: 16)")
    s.add_argument("--max-model-len", type=int, default=2048, help="context length per sequence (default: 2048)")
    s.add_argument("--kv-cache-dtype", default="auto", choices=kv_schemes.NAMES,
                   help="KV pool storage (default: auto): " + kv_schemes.choices_help() + " (KIVI: the open page "
                        "in full precision; fp8: the checkpoint's calibrated scales when it has them)")
    s.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV pool capacity in tokens (default: max-num-seqs x max-model-len)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 (default: 256)")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    s.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                   help="after Ctrl-C or SIGTERM, seconds running requests get to finish before they are aborted "
                        "(default: 10)")
    s.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--activations", default="fp16", type=_activations, help=ACT_HELP)
    s.add_argument("--no-prepack", dest="prepack", action="store_false",
                   help="CPU: run dense bf16 Linears (the LM head; all Linears of an unquantized model) on their "
                        "own weights instead of prepared copies (oneDNN-prepacked bf16, or fp32 on CPUs without "
                        "native bf16 matmuls): less memory, slower decode steps")
    s.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run decode steps eagerly instead of replaying them as CUDA graphs (one per "
                        "batch-size bucket, captured on first use)")
    s.add_argument("--engine", default="llmzip", choices=["llmzip", "vllm"],
                   help="llmzip's engine, or vLLM's OpenAI server on the same checkpoint (optional extra)")
    s.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: GPUs to shard over")

    d = sub.add_parser("demo", help="quantize the demo model to INT4 and compare its perplexity with bf16")
    d.add_argument("-o", "--output", default="llmzip-demo", help="where to write checkpoints (default: ./llmzip-demo)")
    d.add_argument("--max-windows", type=int, default=8, help="perplexity windows of 2048 tokens (default: 8)")
    d.add_argument("--json", action="store_true", help="print the table as JSON on the last line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="llmzip: %(message)s")
    try:
        from . import commands

        handler = getattr(commands, args.command if args.command != "eval" else f"eval_{args.eval_command}")
        return handler(args)
    except KeyboardInterrupt:
        print("llmzip: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - bad input gets one line, anything else its traceback
        from .errors import user_message

        message = user_message(e)
        if message is not None:
            print(f"llmzip: error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT
        traceback.print_exc()
        print("llmzip: internal error (please report it with the traceback above)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
