"""`llmzip.quantize`: model in, quantized model (and optionally a checkpoint) out."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .algorithms import rtn
from .checkpoint import check_output_dir, checkpoint_names, quantization_config, save
from .calibration import CalibConfig, calibration_ids
from .config import CALIBRATED, ConfigError, QuantConfig
from .models import load_lazy_pretrained, load_pretrained
from .moe import prepare_experts
from .quant_linear import QuantLinear
from .sequential import peak_rss_bytes
from .surgery import set_module, split_targets, targets

log = logging.getLogger("llmzip")
# Group sizes `auto_group_size` tries, best first (128 is the common default of GPTQ/AWQ
# tools; smaller groups cost more scale bytes but divide more layer widths, e.g. 576).
AUTO_GROUP_SIZES = (128, 64, 32)


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
def quantize_model(model: nn.Module, config: QuantConfig, progress: bool = True, device=None, lazy=None) -> dict:
    """Replace every targeted nn.Linear of `model` by a QuantLinear, in place.

    device: where the rounding math runs (default: CUDA when available, else CPU);
    one weight at a time is moved there, so memory on it stays ~one layer.
    lazy: llmzip.lazy.LazyWeights when Linears are still on the meta device; each is
    read from disk just before it is quantized, the rest at the end.

    Returns a report: {"quantized": [...], "ignored": [...], "layers": {name: {"rel_err": e}}}
    where rel_err = ||W - dequant(q)||_F / ||W||_F per layer.
    """
    quantized, ignored = targets(model, config)  # validates every layer before any work
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not quantized:
        raise ValueError("no Linear layer left to quantize: check --ignore")
    layers = {}
    for name in tqdm(quantized, desc=f"{config.method} w{config.weights.bits}", unit="layer", disable=not progress):
        lin = model.get_submodule(name)
        if lazy is not None:
            lazy.materialize(lin, name + ".")
        w = lin.weight.data.to(device)
        scheme = config.scheme_for(name)
        res = rtn(w, scheme, config.clip)
        layers[name] = {"rel_err": res.rel_err(w, scheme.group_size)}
        home = lin.weight.device
        zero = None if res.zero is None else res.zero.to(home)
        set_module(model, name, QuantLinear.from_quantized(lin, res.q.to(home), res.scale.to(home), zero,
                                                           scheme, res.g_idx))
        del lin, w
    if lazy is not None:
        lazy.materialize(model, "")  # what no Linear loop touched (ignored Linears)
    return {"quantized": quantized, "ignored": ignored, "layers": layers}


def quantize(
    model: str | nn.Module,
    config: QuantConfig,
    output_dir: str | Path | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
    calib: CalibConfig | None = None,
    resume: bool = False,
    lazy: bool = True,
    auto_group_size: bool = False,
):
    """Quantize a model (demo alias, local dir, hub id or a loaded nn.Module).

    Writes a compressed-tensors checkpoint to `output_dir` when given. Calibrated
    methods (gptq) read `calib` (default: CalibConfig(), the built-in "lee" text)
    and need the tokenizer (loaded with the model when `model` is a string); they
    save each finished layer next to `output_dir`, and `resume=True` continues from
    there after a crash, with a bit-identical result. config.rotate rotates the float
    model first (in place when `model` is an nn.Module; the whole model is loaded).
    lazy (when `model` is a name): read weights from disk layer by layer as they are
    quantized, so the full-precision model never sits in memory (llmzip.lazy); False
    loads the whole model first. Both give bit-identical checkpoints.
    auto_group_size: ignore config.weights.group_size and use the largest of
    AUTO_GROUP_SIZES that divides every quantized layer's input features (logged once;
    see fit_group_size). False (the default) uses the config's group size as given, and
    a layer it does not divide is a ConfigError.
    Returns (model, report).
    """
    t0 = time.perf_counter()
    if output_dir is not None:
        check_output_dir(output_dir)
        g = config.gptq
        if config.uses_gptq and g.act_order and not g.static_groups and config.weights.group_size:
            raise ConfigError(
                "act-order with dynamic groups needs a g_idx, which compressed-tensors >= 0.20 no longer "
                "stores: use static_groups=True (what --act-order does) to write a checkpoint"
            )
    source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    weights = None
    # a rotation touches every weight at once; the sensitivity pass of --avg-bits runs the float model
    if isinstance(model, str) and lazy and not config.rotate and config.avg_bits is None:
        model, tokenizer, weights = load_lazy_pretrained(model, dtype, config.method in CALIBRATED, trust_remote_code)
    elif isinstance(model, str):
        model, tokenizer = load_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
    rotation = None
    if config.rotate:
        from .rotation import rotate_model

        rotation = rotate_model(model, config.rotate_seed)
        log.info("rotation: %s of the residual stream (%s), head_dim %d%s", rotation["kind"],
                 rotation["construction"], rotation["head_dim"], ", LM head untied" if rotation["untied"] else "")
    experts = prepare_experts(model)  # fused MoE experts -> one Linear per expert projection
    if experts:
        log.info("mixture of experts: %d expert blocks split into per-expert Linears", len(experts))
    if auto_group_size:
        config = fit_group_size(model, config)
    calib_meta, mixed = None, None
    if config.avg_bits is not None and not config.schemes:  # schemes given: already allocated
        config, mixed, calib_meta = _allocate_bits(model, tokenizer, config, calib or CalibConfig(), device, progress)
    if config.method in CALIBRATED:
        report, calib_meta = _calibrated(model, tokenizer, config, calib or CalibConfig(), device, progress,
                                         output_dir, resume, weights)
    else:
        report = quantize_model(model, config, progress=progress, device=device, lazy=weights)
    if config.kv_cache == "fp8":
        calib_meta = _kv_scales(model, tokenizer, calib or CalibConfig(), progress, report) or calib_meta
    if mixed is not None:
        report["mixed"] = mixed
    report["config"] = config
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["peak_rss_mib"] = round(peak_rss_bytes() / 2**20)
    if output_dir is not None:
        metadata = {
            "format_version": 1,
            "method": config.method,
            "config": config.to_dict(),
            "source": str(source),
            "versions": versions(),
            "calibration": calib_meta,  # None for RTN, which uses no data
            "rotation": rotation,
            "mixed": mixed,
            "kv_cache": {"dtype": "fp8", "scales": report["kv_scales"]} if config.kv_cache else None,
            "layers": report["layers"],
            "blocks": report.get("blocks"),
            "tune": report.get("tune"),
            "quantize_seconds": report["seconds"],
            "peak_rss_mib": report["peak_rss_mib"],
        }
        act = config.uses_gptq and config.gptq.act_order and config.weights.group_size is not None
        qc = quantization_config(config.weights, report["ignored"], "weight" if act else None,
                                 kv_fp8=config.kv_cache == "fp8",
                                 schemes=checkpoint_names(model, {n: config.scheme_for(n) for n in report["quantized"]})
                                 if config.schemes else None)
        report["output_dir"] = str(save(model, tokenizer, output_dir, qc, metadata))
    checkpoints = report.pop("checkpoints", None)
    if checkpoints is not None:
        checkpoints.clear()  # the checkpoint is complete; progress is no longer needed
    return model, report


def fit_group_size(model: nn.Module, config: QuantConfig) -> QuantConfig:
    """`config` with the largest group size of AUTO_GROUP_SIZES that divides the input
    features of every Linear it quantizes (the choice is logged). ConfigError when none
    does: per-channel (group_size None) or --ignore the layer are the ways out."""
    quantized, _ = split_targets(model, config)
    widths = {name: model.get_submodule(name).in_features for name in quantized}
    for i, g in enumerate(AUTO_GROUP_SIZES):
        odd = next((n for n, w in widths.items() if w % g), None)
        if odd is None:
            if i:
                first = next(n for n, w in widths.items() if w % AUTO_GROUP_SIZES[0])
                log.info("group size %d (auto): %s does not divide every quantized layer (%s has %d input "
                         "features); --group-size sets it", g, "/".join(map(str, AUTO_GROUP_SIZES[:i])), first,
                         widths[first])
            return replace(config, weights=replace(config.weights, group_size=g))
    raise ConfigError(
        f"no group size of {'/'.join(map(str, AUTO_GROUP_SIZES))} divides the {widths[odd]} input features of "
        f"layer '{odd}': use --group-size -1 for per-channel scales, or --ignore the layer"
    )


def work_dir(output_dir: str | Path) -> Path:
    """Hidden directory next to the output where a calibrated run keeps its progress."""
    out = Path(output_dir).expanduser().resolve()
    return out.parent / f".{out.name}.llmzip-work"


def _allocate_bits(model, tokenizer, config, calib: CalibConfig, device, progress):
    """--avg-bits: measure each unit's sensitivity on the calibration text and allocate
    widths under the budget (llmzip.mixed). Returns (config with schemes, report, calib metadata)."""
    from .mixed import mixed_config

    if tokenizer is None:
        raise ValueError("--avg-bits measures sensitivity on calibration text and needs the tokenizer: pass tokenizer=")
    quantized, _ = split_targets(model, config)
    ids, digest = calibration_ids(tokenizer, calib)
    config, mixed = mixed_config(model, config, ids, quantized, device=device, progress=progress)
    return config, mixed, {**calib.to_dict(), "digest": digest}


def _kv_scales(model, tokenizer, calib: CalibConfig, progress: bool, report: dict) -> dict | None:
    """Calibrate static FP8 K/V scales on the quantized model and attach them for export.
    Returns the calibration metadata when no earlier step used data (RTN), else None."""
    from .kv_cache import attach_fp8_scales, calibrate_fp8_scales

    if tokenizer is None:
        raise ValueError("FP8 KV-cache calibration needs the tokenizer: pass tokenizer=")
    ids, digest = calibration_ids(tokenizer, calib)
    log.info("kv cache: calibrating FP8 K/V scales on %d samples x %d tokens", *ids.shape)
    scales = calibrate_fp8_scales(model, ids, progress)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    attach_fp8_scales(model, scales, dtype)
    report["kv_scales"] = [[round(k, 8), round(v, 8)] for k, v in scales]
    return {**calib.to_dict(), "digest": digest}


def _calibrated(model, tokenizer, config, calib, device, progress, output_dir, resume, lazy):
    from .resume import LayerCheckpoints
    from .sequential import calibrate_model

    if tokenizer is None:
        raise ValueError("calibrated quantization needs the tokenizer: pass tokenizer=")
    quantized, ignored = targets(model, config)
    ids, digest = calibration_ids(tokenizer, calib)
    log.info("calibration: %d samples x %d tokens from '%s' (digest %s)", *ids.shape, calib.source, digest)
    checkpoints = None
    if output_dir is not None:
        fingerprint = {"config": config.to_dict(), "calib_digest": digest, "targets": quantized, "versions": versions()}
        checkpoints = LayerCheckpoints(work_dir(output_dir), fingerprint)
    report = calibrate_model(model, config, ids, quantized, device=device, progress=progress,
                                 checkpoints=checkpoints, resume=resume, lazy=lazy)
    floats = report.pop("float_outputs", None)
    if config.tune.epochs:
        from .tuning import tune_scales

        teacher = torch.cat([f.cpu() for f in floats])
        del floats
        report["tune"] = tune_scales(model, ids, teacher, config.tune, device=device, progress=progress)
    report.update(quantized=quantized, ignored=ignored)
    report["checkpoints"] = checkpoints
    return report, {**calib.to_dict(), "digest": digest}
