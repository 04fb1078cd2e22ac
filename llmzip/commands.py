"""Implementations of the CLI commands (argument parsing lives in cli.py)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .console import EXIT_OK, EXIT_REGRESSION, print_json, torch_dtype
from .models import check_same_tokenizer, load_for_eval

log = logging.getLogger("llmzip")


def _names(text: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def quantize(args) -> int:
    from .api import AUTO_GROUP_SIZES, quantize as run
    from .calibration import CalibConfig
    from .config import (DEFAULT_IGNORE, ClipSearch, GPTQSettings, QuantConfig, SignRoundSettings, TuneSettings,
                         WeightScheme, clip_by_default)
    from .recipes import apply_recipe

    apply_recipe(args)
    clip = clip_by_default(args.method) if args.clip_search is None else args.clip_search
    auto_group = args.group_size == "auto"
    config = QuantConfig(
        gptq=GPTQSettings(damp=args.damp, act_order=args.act_order, static_groups=args.act_order,
                          true_sequential=args.true_sequential, scale_refit=args.scale_refit),
        signround=SignRoundSettings(**{k: v for k, v in (("iters", args.iters), ("batch", args.signround_batch),
                                                                 ("lr", args.signround_lr),
                                                                 ("loss", args.signround_loss),
                                                                 ("target", args.signround_target))
                                       if v is not None}),
        tune=TuneSettings(**{k: v for k, v in (("epochs", args.tune_epochs), ("lr", args.tune_lr)) if v is not None}),
        method=args.method,
        weights=WeightScheme(bits=args.bits, group_size=AUTO_GROUP_SIZES[0] if auto_group else args.group_size,
                             symmetric=not args.asym),
        clip=ClipSearch(grid=args.clip_grid) if clip else None,
        ignore=tuple(args.ignore) if args.ignore else DEFAULT_IGNORE,
        kv_cache=args.kv_cache,
        rotate=args.rotate,
        rotate_seed=args.rotate_seed,
        avg_bits=args.avg_bits,
        bits_choices=args.bits_choices,
    )
    output = args.output
    if args.format == "gguf":  # quantize into a hidden checkpoint next to the file, then export it
        output = _gguf_staging(config, args.output)
    _, report = run(
        args.model, config, output_dir=output, dtype=torch_dtype(args.dtype),
        trust_remote_code=args.trust_remote_code, device=args.device,
        calib=CalibConfig(args.calib, args.samples, args.seq_len, args.seed, args.chat) if args.method != "rtn" or args.kv_cache or args.avg_bits else None,
        resume=args.resume, lazy=not args.load_whole_model, auto_group_size=auto_group,
    )
    if args.format == "gguf":
        return _finish_gguf(output, args)
    from .info import format_report, size_report

    size = size_report(report["output_dir"])
    log.info("wrote %s in %.1fs (%d layers quantized, %d kept; peak RSS %d MiB)", report["output_dir"],
             report["seconds"], len(report["quantized"]), len(report["ignored"]), report["peak_rss_mib"])
    print(format_report(size))
    if args.json:
        print_json({"output_dir": report["output_dir"], "seconds": report["seconds"],
                    "quantized_layers": len(report["quantized"]), "ignored": report["ignored"],
                    "bits_per_weight": size["bits_per_weight"], "ratio_to_bf16": size["ratio_to_bf16"],
                    "tensor_bytes": size["tensor_bytes"], "peak_rss_mib": report["peak_rss_mib"]})
    return EXIT_OK


def _gguf_staging(config, output: str) -> Path:
    from .config import ConfigError
    from .gguf_blocks import mapping_for

    if config.avg_bits is not None:
        raise ConfigError("--avg-bits writes layers of several widths, which one GGUF type cannot hold: "
                          "drop --avg-bits with --format gguf")
    mapping_for(config.weights)  # an exact GGUF type, or a one-line error before any work
    if config.kv_cache:
        raise ConfigError("--kv-cache-dtype fp8 scales have no place in a GGUF file; drop --kv-cache-dtype with --format gguf")
    out = Path(output).expanduser().resolve()
    if out.is_dir():
        raise ConfigError(f"with --format gguf, -o names a file (model.gguf); {out} is a directory")
    return out.parent / f".{out.name}.checkpoint"


def _finish_gguf(staging: Path, args) -> int:
    import shutil

    from .gguf_export import export_gguf

    try:
        report = export_gguf(staging, args.output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _print_export(report, args)


def _print_export(report: dict, args) -> int:
    inexact = f", {report['inexact_blocks']} of {report['blocks']} Q4_1 minima rounded to fp16" \
        if report["inexact_blocks"] else ""
    print(f"wrote {report['path']} ({report['type']}, {report['tensors']} tensors{inexact})")
    if args.json:
        print_json(report)
    return EXIT_OK


def export(args) -> int:
    from .gguf_export import export_gguf

    return _print_export(export_gguf(args.model, args.output), args)


def _eval_ids(model: str, source: str, ctx: int, stride: int | None = None, max_windows: int | None = None):
    """(token ids, tokenizer) of an evaluation text, checked before any model is loaded:
    a readable, non-blank text of at least one window of `ctx` tokens (DataError), and
    window settings that make sense (ConfigError)."""
    from .config import ConfigError
    from .data import DataError, load_text
    from .eval.perplexity import tokenize
    from .models import load_tokenizer

    if ctx < 2:
        raise ConfigError(f"--ctx {ctx} is too small: a window of ctx tokens scores ctx - 1 of them, use at least 2")
    if stride is not None and not 0 < stride <= ctx:
        raise ConfigError(f"--stride {stride} must be between 1 and --ctx ({ctx})")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"--max-windows {max_windows} must be at least 1 (leave it out for the whole text)")
    text = load_text(source)
    if not text.strip():
        raise DataError(f"text source '{source}' is empty or only whitespace: give a text of at least {ctx} tokens")
    tok = load_tokenizer(model)
    ids = tokenize(tok, text)
    if ids.numel() < ctx:
        raise DataError(f"text source '{source}' has {ids.numel()} tokens, fewer than one window of --ctx {ctx}: "
                        "give a longer text or a smaller --ctx")
    return ids, tok


def eval_ppl(args) -> int:
    from .eval.perplexity import perplexity

    ids, tok = _eval_ids(args.model, args.data, args.ctx, args.stride, args.max_windows)  # before loading a model
    kv = None
    if args.kv_cache:
        from .config import ConfigError
        from .kv_cache import KVCacheConfig

        try:
            kv = KVCacheConfig(args.kv_cache, residual=args.kv_residual, group=args.kv_group)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    model, _ = load_for_eval(args.model, torch_dtype(args.dtype), tokenizer=tok, activations=args.activations)
    res = perplexity(model, ids, ctx=args.ctx, stride=args.stride, max_windows=args.max_windows, kv_cache=kv,
                     kv_chunk=args.kv_chunk)
    print(f"ppl {res.ppl:.4f}  ({res.tokens} tokens, {res.windows} windows of {res.ctx}, "
          f"{res.dtype}, {res.tokens_per_s:.0f} tok/s" + (f", KV cache {res.kv_cache}" if kv else "")
          + (f", activations {args.activations})" if args.activations != "fp16" else ")"))
    if args.json:
        out = res.to_dict()
        out.update(model=args.model, data=args.data, activations=args.activations)
        print_json(out)
    return EXIT_OK


def eval_tasks(args) -> int:
    from .eval.tasks import check_tasks, run_tasks

    names = _names(args.tasks)
    check_tasks(names, args.include_path)  # before loading a model
    model, tok = load_for_eval(args.model, torch_dtype(args.dtype))
    results = run_tasks(model, tok, names, limit=args.limit, batch_size=args.batch_size,
                        include_path=args.include_path)
    for r in results:
        speed = f", {r.tokens / r.seconds:.0f} tok/s" if r.tokens and r.seconds else ""
        print(f"{r.task:<14} {r.metric:<12} {r.value:.4f} +- {r.stderr:.4f}  (n={r.n}, {r.seconds:.1f}s{speed})")
    if args.json:
        print_json({"model": args.model, "results": [r.to_dict() for r in results]})
    return EXIT_OK


def eval_kld(args) -> int:
    from .eval.kld import kl_divergence

    ids, base_tok = _eval_ids(args.base, args.data, args.ctx, max_windows=args.max_windows)  # before loading
    base, _ = load_for_eval(args.base, torch_dtype(args.dtype), tokenizer=base_tok)
    model, tok = load_for_eval(args.model, torch_dtype(args.dtype))
    check_same_tokenizer(base_tok, tok, args.base, args.model)
    res = kl_divergence(base, model, ids, ctx=args.ctx, max_windows=args.max_windows)
    print(f"KLD mean {res.mean_kld:.5f}  median {res.median_kld:.5f}  p99 {res.p99_kld:.4f}  "
          f"top-1 agreement {res.top1_agreement:.4f}  ppl {res.ppl:.4f} / base {res.base_ppl:.4f} "
          f"= {res.ppl_ratio:.4f}  ({res.tokens} tokens)")
    if args.json:
        print_json({**res.to_dict(), "base": args.base, "model": args.model, "data": args.data})
    return EXIT_OK


def compare(args) -> int:
    from .config import ConfigError
    from .eval.compare import Thresholds, compare as run, format_table, parse_fraction

    try:
        inc = None if args.max_ppl_increase is None else parse_fraction(args.max_ppl_increase)
    except ValueError:
        raise ConfigError(f"--max-ppl-increase {args.max_ppl_increase!r}: use a percentage (2%) or fraction (0.02)")
    tasks = _names(args.tasks)
    _eval_ids(args.base, args.data, args.ctx, max_windows=args.max_windows)  # bad text: refused before any model loads
    report = run(args.base, args.models, args.data, args.ctx, args.max_windows, args.report,
                 Thresholds(max_ppl_increase=inc, max_kld=args.max_kld, max_acc_drop=args.max_acc_drop),
                 dtype=torch_dtype(args.dtype), tasks=tasks, limit=args.limit, batch_size=args.batch_size,
                 include_path=args.include_path)
    print(format_table(report))
    print(f"report: {Path(args.report) / 'report.md'}" + (f" (+ {', '.join(report['plots'])})" if report["plots"] else ""))
    if args.json:
        print_json({"passed": report["passed"], "report_dir": str(args.report),
                    "rows": [{k: r[k] for k in ("model", "ppl", "ppl_ratio", "mean_kld", "top1_agreement",
                                                "bits_per_weight", "failures")}
                             | {"tasks": [{k: x[k] for k in ("task", "metric", "value", "base_value", "drop_points")}
                                          for x in r["tasks"]]} for r in report["rows"]]})
    if not report["passed"]:
        print("llmzip: quality regression: " + "; ".join(f"{r['model']}: {', '.join(r['failures'])}"
                                                        for r in report["rows"] if r["failures"]), file=sys.stderr)
        return EXIT_REGRESSION
    return EXIT_OK


def convert(args) -> int:
    from .convert import convert as run

    out = run(args.model, args.output)
    print(f"wrote {out}")
    return EXIT_OK


def info(args) -> int:
    from .info import format_kernel_report, format_report, kernel_report, size_report

    r = size_report(args.path)
    print(format_report(r))
    if args.kernels:
        r["kernels"] = kernel_report(args.path, args.device)
        print(format_kernel_report(r["kernels"]))
    if args.json:
        print_json(r)
    return EXIT_OK


def demo(args) -> int:
    """bf16 vs RTN W4 g64 (sym) on the demo model: size and perplexity, as a table."""
    from .config import QuantConfig, WeightScheme
    from .data import load_text
    from .eval.perplexity import perplexity, tokenize
    from .info import size_report
    from .models import resolve
    from .api import quantize as run

    base_dir = resolve("smollm2-135m")
    out = Path(args.output) / "smollm2-135m-w4g64"
    config = QuantConfig(weights=WeightScheme(bits=4, group_size=64, symmetric=True))
    run(base_dir, config, output_dir=out)
    text = load_text("wiki")
    rows = []
    for label, spec in (("bf16", base_dir), ("rtn w4 g64 sym", str(out))):
        model, tok = load_for_eval(spec)
        res = perplexity(model, tokenize(tok, text), ctx=2048, max_windows=args.max_windows)
        size = sum(f.stat().st_size for f in Path(spec).glob("*.safetensors"))
        rows.append({"model": label, "ppl": round(res.ppl, 4), "bytes": size, "tokens": res.tokens})
    base = rows[0]
    print(f"\nSmolLM2-135M, built-in Wikipedia text, {rows[0]['tokens']} tokens, ctx 2048")
    print(f"{'model':<16} {'ppl':>9} {'ppl ratio':>10} {'MiB':>8} {'size ratio':>11}")
    for r in rows:
        print(f"{r['model']:<16} {r['ppl']:>9.3f} {r['ppl'] / base['ppl']:>10.4f} "
              f"{r['bytes'] / 2**20:>8.1f} {r['bytes'] / base['bytes']:>11.3f}")
    print(f"\ncheckpoint: {out}  (load with llmzip.load or transformers.AutoModelForCausalLM)")
    if args.json:
        print_json({"rows": rows, "bits_per_weight": size_report(out)["bits_per_weight"]})
    return EXIT_OK


def serve(args) -> int:
    from .config import ConfigError
    from .serve.server import ServeOptions, serve as run_server

    for name in ("max_num_seqs", "max_model_len", "max_queue"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    try:
        return run_server(ServeOptions.from_namespace(args, dtype=torch_dtype(args.dtype)))
    except (ValueError, ImportError) as e:  # bad options, or an optional extra not installed
        raise ConfigError(str(e)) from e
