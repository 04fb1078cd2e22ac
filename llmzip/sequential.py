"""Layer-by-layer calibrated quantization (GPTQ, AWQ, SignRound and their recipes) in bounded memory.

1. Run the calibration samples through the embeddings and catch what enters
   decoder layer 0 (hidden states plus the keyword arguments the model passes).
2. For each decoder layer: move only it to the compute device, run the method's
   steps on it (llmzip.steps: e.g. AWQ smoothing, then GPTQ rounding from input
   Hessians that hooks accumulate), which swap in QuantLinear modules, and re-run the
   quantized layer to produce the next layer's inputs (so later layers calibrate on
   what they will see).
   With SignRound's target "model" (QuantConfig.float_stream), the float model's own
   hidden states are carried beside the quantized ones: the float layer's outputs on
   them are both what the quantized layer is fitted to and the next layer's float
   inputs.
Only one decoder layer and the activations of the calibration set are on the
compute device at a time.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import arch_of, decoder_layers
from .config import QuantConfig
from .kernels.cpu_dense import fp32_products
from .moe import expert_token_counts
from .quant_linear import QuantLinear, cached_dense_weights
from .resume import LayerCheckpoints
from .steps import LayerWork, reference_keep, run_steps
from .surgery import set_module

log = logging.getLogger("llmzip")

# Calibration samples are run through a layer in batches of about this many tokens:
# fewer, larger GEMMs (and Hessian updates) than one sample at a time, with activations
# still small next to a layer's weights.
FORWARD_TOKENS = 2048
# The float layer's outputs are kept for this many batches only (the reference of each
# layer's rel_update_mse): 8192 tokens estimate it well, and the other outputs would be
# a third copy of the calibration activations.
REF_BATCHES = 4


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0: records its inputs, then stops the forward pass."""

    def __init__(self, store: list, kwargs: dict):
        super().__init__()
        self.store, self.kwargs = store, kwargs

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append(hidden_states)
        if not self.kwargs:
            self.kwargs.update(kwargs)
        raise _Caught


def batched(samples: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """Concatenate runs of consecutive [1, L, d] samples of the same shape into batches of
    at most max(1, tokens // L) samples (the kwargs broadcast over the batch)."""
    runs: list[list[torch.Tensor]] = []
    for x in samples:
        run = runs[-1] if runs else None
        if run and run[0].shape == x.shape and (len(run) + 1) * x.shape[1] <= max(tokens, x.shape[1]):
            run.append(x)
        else:
            runs.append([x])
    return [torch.cat(run) if len(run) > 1 else run[0] for run in runs]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, device) -> tuple[list, dict]:
    """Hidden states entering layer 0 for each sample (batch of 1), and the kwargs."""
    store, kwargs = [], {}
    saved = dict(layers._modules)
    # Leave only the catcher in the layer list, so moving the model to the device
    # moves the embeddings and rotary tables but no decoder layer.
    layers._modules.clear()
    layers._modules["0"] = _Catcher(store, kwargs)
    try:
        model.to(device)
        for row in ids:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _Caught:
                pass
        model.to("cpu")
    finally:
        layers._modules.clear()
        layers._modules.update(saved)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    return store, kwargs


@torch.no_grad()
def calibrate_model(
    model: nn.Module,
    config: QuantConfig,
    ids: torch.Tensor,
    targets: list[str],
    device=None,
    progress: bool = True,
    checkpoints: LayerCheckpoints | None = None,
    resume: bool = False,
    lazy=None,
) -> dict:
    """Quantize `targets` (names of nn.Linear) of `model` in place with a calibrated
    method (config.method: a recipe of steps, config.steps).

    ids: [samples, seq_len] calibration tokens. checkpoints: where finished layers
    are saved; with resume=True, layers already saved there are restored instead of
    recomputed. lazy: llmzip.lazy.LazyWeights when the decoder layers are still on the
    meta device; each is read from disk just before it is quantized. Returns {"layers": per-Linear stats, "blocks": per-layer stats}.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with fp32_products(device):
        return _calibrate(model, config, ids, targets, device, progress, checkpoints, resume, lazy)


def _calibrate(model, config, ids, targets, device, progress, checkpoints, resume, lazy) -> dict:
    arch = arch_of(model)
    layers = decoder_layers(model)
    prefix = _prefix(model, layers)
    outside = [t for t in targets if not t.startswith(prefix)]
    if outside:
        raise ValueError(f"calibrated methods quantize Linears inside decoder layers only; --ignore these: {outside[:5]}")
    saved = checkpoints.progress() if (checkpoints and resume) else None
    if resume and checkpoints and not saved:
        log.info("resume: no matching progress in %s; starting from layer 0", checkpoints.dir)
    done = saved["done"] if saved else 0
    stats, blocks = (saved["layers"], saved["blocks"]) if saved else ({}, [])
    if checkpoints and not saved:
        checkpoints.start()
    # The kwargs (rotary tables, mask) depend only on the sequence length.
    inputs, kwargs = capture_inputs(model, layers, ids[:1] if saved else ids, device)
    inputs = batched(inputs, FORWARD_TOKENS)
    if saved:
        log.info("resume: %d of %d layers restored from %s", done, len(layers), checkpoints.dir)
        for i in range(done):
            _restore_layer(layers[i], f"{prefix}{i}.", targets, config, checkpoints.layer_state(i))
        inputs = [x.to(device) for x in checkpoints.inputs(done)]
    # The float model's inputs of the next layer; layer 0's are the quantized stream's.
    floats = None
    if config.float_stream:
        floats = [x.to(device) for x in checkpoints.inputs(done, "float_inputs")] if saved else list(inputs)
    bar = tqdm(range(len(layers)), desc=config.method, unit="layer", initial=done, disable=not progress)
    for i in range(done, len(layers)):
        if lazy is not None:
            lazy.materialize(layers[i], f"{prefix}{i}.")
        layer = layers[i].to(device)
        inputs, floats, layer_stats, block = _quantize_layer(layer, f"{prefix}{i}.", set(targets), inputs, kwargs,
                                                             config, arch, i, progress, floats)
        stats.update(layer_stats)
        blocks.append({"layer": i, **block})
        layers[i] = layer.to("cpu")
        if checkpoints:
            checkpoints.save_layer(i, layers[i].state_dict(), inputs, stats, blocks, floats)
        mem = {"rss_gib": f"{peak_rss_bytes() / 2**30:.2f}"}
        if device.type == "cuda":
            mem["gpu_gib"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"
        bar.set_postfix(mem)
        bar.update(1)
    bar.close()
    report = {"layers": stats, "blocks": blocks}
    if config.tune.epochs:  # the float model's last hidden states: the targets of llmzip.tuning
        report["float_outputs"] = floats
    return report


def _quantize_layer(layer, prefix: str, targets: set, inputs: list, kwargs: dict, config: QuantConfig, arch,
                    index: int = 0, progress: bool = False, floats: list | None = None):
    """Run the recipe's steps (config.steps, llmzip.steps) on one decoder layer; returns
    (next inputs, next float inputs (None without `floats`), stats, block). floats: the
    float model's inputs of this layer, when the run carries them."""
    t0 = time.perf_counter()
    names = {n: m for n, m in layer.named_modules() if prefix + n in targets}
    # With a float stream the fits and the error below use the float model's outputs: no
    # step needs to keep the float layer's own outputs.
    keep = 0 if floats is not None else reference_keep(config.steps, REF_BATCHES)
    work = LayerWork(layer, prefix, names, inputs, kwargs, config, arch, keep, index, progress)
    if floats is not None:  # before any step changes the layer
        with torch.no_grad():
            work.fit_targets = [work.run(x) for x in floats]
    run_steps(work, config.steps)
    stats, block, ref = work.stats, work.block, work.ref
    routed = expert_token_counts(layer)
    if routed:
        block["expert_tokens"] = routed
        for n, counts in routed.items():
            if min(counts) == 0:
                log.info("%s%s: experts %s got no routed calibration tokens (calibrated on all tokens)", prefix, n,
                         [e for e, c in enumerate(counts) if c == 0])
    with cached_dense_weights(layer):
        outs = [_first(layer(x, **kwargs)) for x in inputs]
    # Error of what the block adds to the residual stream (out - in), relative to
    # that update: the residual itself would hide the error. Over the first REF_BATCHES.
    # With a float stream, against the float model's own outputs and update.
    if floats is not None:
        ref, start = work.fit_targets, floats
    else:
        start = inputs
    num = sum((o.float() - r.float()).pow(2).sum().item() for o, r in zip(outs[:REF_BATCHES], ref))
    den = sum((r.float() - x.float()).pow(2).sum().item() for r, x in zip(ref[:REF_BATCHES], start))
    block.update(rel_update_mse=round(num / max(den, 1e-30), 6), seconds=round(time.perf_counter() - t0, 3))
    return outs, work.fit_targets, stats, block


def _restore_layer(layer, prefix: str, targets: list, config: QuantConfig, state: dict) -> None:
    """Swap in QuantLinear modules for a layer finished in an earlier run and load it."""
    for n, lin in list(layer.named_modules()):
        if prefix + n in targets and isinstance(lin, nn.Linear):
            ql = QuantLinear(lin.in_features, lin.out_features, config.scheme_for(prefix + n), lin.bias is not None,
                             act_order=f"{n}.weight_g_idx" in state, dtype=lin.weight.dtype, device="cpu")
            set_module(layer, n, ql)
    layer.load_state_dict(state, strict=True, assign=True)  # assign: the layer may still be on meta


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name + "."
    raise ValueError("decoder layers are not a submodule of the model")

