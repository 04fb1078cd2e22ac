"""End-to-end tuning of the quantization scales (`--tune-epochs N`), after the
layer-by-layer calibration.

Layer by layer, each fit sees one block's output error only. This pass then fits the
whole quantized model at once to the float model's next-token distribution: the
integer codes stay fixed and every group scale s of every QuantLinear is trained as
s0 * exp(u), by Adam on the mean KL divergence KL(float || quantized) over the
calibration tokens (the scale step of EfficientQAT's end-to-end phase, Chen et al.,
2024, with a distillation loss). The checkpoint keeps its format: only the values of
`weight_scale` change, rounded to their storage dtype exactly as during the fit.

The float model's distribution is its logits on its own final hidden states, which the
calibration carries (QuantConfig.float_stream): no float model is kept or re-run.
Memory: the whole quantized model, the calibration's final hidden states and one
batch's activations and logits for the backward pass; unlike the calibration itself
this pass does not hold one layer at a time.

On a CPU without native matmuls for the model's half dtype (kernels.cpu_dense), the
pass runs in fp32: the dequantized weights are still the half values the checkpoint
decodes to, cast up exactly.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .algorithms.signround import store_ste
from .config import TuneSettings
from .packing import unpack_int32
from .primitives import dequantize
from .quant_linear import QuantLinear
from .surgery import set_module

log = logging.getLogger("llmzip")


class ScaleFit(nn.Module):
    """Stands in for a QuantLinear during the pass: its codes and zero points fixed,
    its scales s0 * exp(log_gain), rounded to the storage dtype with a straight-through
    gradient."""

    def __init__(self, ql: QuantLinear, compute: torch.dtype):
        super().__init__()
        n_out, n_in, bits = ql.out_features, ql.in_features, ql.bits
        q = unpack_int32(ql.weight_packed, bits, n_in, dim=1).to(torch.int16)
        n_groups = ql.weight_scale.shape[1]
        g_idx = getattr(ql, "weight_g_idx", None)
        self.group = None if n_groups == 1 or g_idx is not None else n_in // n_groups
        zero = None
        if not ql.scheme.symmetric:
            zero = unpack_int32(ql.weight_zero_point, bits, n_out, dim=0).to(torch.int16)
        self.register_buffer("code", q)
        self.register_buffer("zero", zero)
        self.register_buffer("g_idx", None if g_idx is None else g_idx.long())
        self.register_buffer("scale0", ql.weight_scale.float())
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale0))
        self.store, self.compute = ql.weight_scale.dtype, compute
        self.bias = None if ql.bias is None else ql.bias.detach().to(compute)

    def scale(self) -> torch.Tensor:
        """The fitted scales in fp32, each the value of its storage dtype (straight-through)."""
        return store_ste(self.scale0 * self.log_gain.exp(), self.store)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.code, self.scale(), self.zero, self.group, self.store, g_idx=self.g_idx)
        return F.linear(x, w.to(self.compute), self.bias)


def tune_scales(model: nn.Module, ids: torch.Tensor, teacher: torch.Tensor, settings: TuneSettings,
                device=None, progress: bool = True) -> dict:
    """Fit the scales of every QuantLinear in `model` (in place) to the float model's
    next-token distribution.

    ids: [N, L] calibration tokens; teacher: [N, L, d] the float model's hidden states
    after its last decoder layer on them (before the final norm). Returns a report:
    settings, mean KL of the first and last epoch, per-epoch means and seconds."""
    from .kernels.cpu_dense import emulated_halves

    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not quantized:
        raise ValueError("tune_scales: the model has no QuantLinear to tune")
    half = next(p for p in model.parameters()).dtype
    compute = torch.float32 if half in emulated_halves(device) else half
    body, head = model.get_decoder(), model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(hidden):
        out = head(hidden).float()
        return out if not cap else torch.tanh(out / cap) * cap

    home = next(p for p in model.parameters()).device
    fits = {n: ScaleFit(m, compute).to(device) for n, m in quantized}
    for n, f in fits.items():
        set_module(model, n, f)
    # The other weights in the compute dtype, frozen; the originals are put back as they were.
    saved = {}
    for name, p in model.named_parameters():
        if not name.endswith("log_gain"):
            saved[name] = (p.data, p.requires_grad)
            p.data = p.data.to(device, compute)
            p.requires_grad_(False)
    model.to(device)
    was_training = model.training
    model.train(False)
    lrs = {n: settings.lr_for(m.bits) for n, m in quantized}
    groups: dict[float, list] = {}
    for n, f in fits.items():
        groups.setdefault(lrs[n], []).append(f.log_gain)
    opt = torch.optim.Adam([{"params": ps, "lr": lr} for lr, ps in sorted(groups.items())])
    n, batch = ids.shape[0], min(settings.batch, ids.shape[0])
    steps_per_epoch = math.ceil(n / batch)
    total = settings.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(total, 1))))
    gen = torch.Generator().manual_seed(settings.seed)
    epochs = []
    bar = tqdm(total=total, desc="tune scales", unit="step", disable=not progress)
    try:
        with torch.enable_grad():
            for _ in range(settings.epochs):
                te, losses = time.perf_counter(), []
                for rows in torch.randperm(n, generator=gen).split(batch):
                    x = ids[rows].to(device)
                    with torch.no_grad():
                        target = F.log_softmax(logits(body.norm(teacher[rows].to(device, compute))), -1)
                    hidden = body(input_ids=x, use_cache=False).last_hidden_state
                    logp = F.log_softmax(logits(hidden), -1)
                    loss = F.kl_div(logp, target, log_target=True, reduction="none").sum(-1).mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    losses.append(loss.item())
                    bar.set_postfix(kl=f"{losses[-1]:.4f}", refresh=False)
                    bar.update(1)
                epochs.append({"kl": float(f"{sum(losses) / len(losses):.6g}"),
                               "seconds": round(time.perf_counter() - te, 2)})
    finally:
        bar.close()
        with torch.no_grad():
            for (name, ql), f in zip(quantized, fits.values()):
                ql.weight_scale.copy_(f.scale().to(ql.weight_scale.device, ql.weight_scale.dtype))
                ql.unbind()
                set_module(model, name, ql)
        for name, p in model.named_parameters():
            if name in saved:
                p.data, grad = saved[name]
                p.requires_grad_(grad)
        model.train(was_training)
        model.to(home)
    by_bits = {str(m.bits): lrs[n] for n, m in quantized}
    report = {"epochs": settings.epochs, "lr": settings.lr if settings.lr is not None else "by bits",
              "lr_by_bits": dict(sorted(by_bits.items())), "batch": batch, "steps": total,
              "kl_first_epoch": epochs[0]["kl"] if epochs else None,
              "kl_last_epoch": epochs[-1]["kl"] if epochs else None,
              "per_epoch": epochs, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("tune scales: %d epochs x %d steps, mean KL %s -> %s in %.0f s", settings.epochs, steps_per_epoch,
             report["kl_first_epoch"], report["kl_last_epoch"], report["seconds"])
    return report
