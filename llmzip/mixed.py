"""Mixed precision under a bits budget (`--avg-bits 3.75 --bits-choices 2,3,4,8`).

1. Units. Linears that vLLM fuses into one matrix at load must share one scheme, so
   bits are allocated per unit, not per Linear: q/k/v of one attention block, gate/up
   of one MLP, and every projection of the experts of one MoE layer. Any other Linear
   is a unit of its own (unit_of).
2. Sensitivity. For each decoder layer (inputs: the float model's, on the first
   `tokens` calibration tokens), each unit and each candidate width b, the unit's
   weights are replaced by their round-to-nearest quantize-dequantize at b bits (the
   config's group size, symmetry and clip search) while the rest of the layer stays
   in float, and the layer's output is compared with the float output: the
   sensitivity is the mean over tokens of ||y_b - y||^2 / ||y||^2, the squared error
   relative to the residual stream the layer writes (which the final norm sees in
   proportion). Relative per token, so that tokens with very large activations do
   not outweigh the rest. The predicted loss of an allocation is the sum of its units'
   sensitivities (errors of different units taken as independent and additive).
3. Cost. A unit's cost at b bits is the exact size of its stored tensors, in bits:
   packed codes (int32 words), scales (the weight's dtype), zero points (asymmetric)
   and the weight_shape tensors, which is what `llmzip info` counts. The budget is
   avg_bits x the number of quantized weights.
4. Allocation (allocate): greedy on marginal gain per bit. Every unit starts at the
   smallest width; while some upgrade fits the budget, apply the one (unit, wider
   width) with the largest drop in predicted loss per added bit. Upgrades may skip
   widths (2 -> 4), so a unit whose loss curve is not convex is still served. This is
   the classic greedy for the multiple-choice knapsack; it ends within one upgrade of
   the budget and is exact when each unit's loss is convex in its cost.

The result is QuantConfig.schemes ({Linear name: WeightScheme}); the rounding steps
(RTN, GPTQ, AWQ, SignRound) read each Linear's scheme through config.scheme_for.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import rtn
from .config import ConfigError, QuantConfig, WeightScheme
from .kernels.cpu_dense import fp32_products
from .packing import packed_len

log = logging.getLogger("llmzip")
# Calibration tokens the sensitivity pass runs through each layer (the first samples
# of the calibration set): about 2 x (units x widths) layer passes per layer.
SENSITIVITY_TOKENS = 4096
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_EXPERTS = re.compile(r"^(.*\.experts)\.\d+\.")


def unit_of(name: str) -> str:
    """The fused unit a Linear belongs to: 'm.layers.0.self_attn.k_proj' ->
    'm.layers.0.self_attn.qkv_proj'; 'm.layers.3.mlp.experts.7.w2' -> 'm.layers.3.mlp.experts';
    anything else is its own unit."""
    m = _EXPERTS.match(name)
    if m:
        return m.group(1)
    parent, _, leaf = name.rpartition(".")
    return f"{parent}.{_FUSED[leaf]}" if leaf in _FUSED else name


def units(names: list[str]) -> dict[str, list[str]]:
    """{unit: [Linear names]} in the order of `names`."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(unit_of(n), []).append(n)
    return out


def scheme_bits(scheme: WeightScheme, out_f: int, in_f: int, scale_bytes: int = 2) -> int:
    """Bits a Linear [out_f, in_f] takes in the checkpoint under `scheme` (llmzip.quant_linear
    layout): packed codes, scales, zero points and the int64 weight_shape."""
    groups = scheme.groups(in_f)
    bits = 32 * out_f * packed_len(in_f, scheme.bits) + 8 * scale_bytes * out_f * groups + 64 * 2
    if not scheme.symmetric:
        bits += 32 * packed_len(out_f, scheme.bits) * groups
    return bits


@dataclass
class Allocation:
    """bits: {unit: width}; cost: bits of all quantized tensors; weights: quantized
    weight count; predicted: sum of the chosen sensitivities."""

    bits: dict[str, int]
    cost: int
    weights: int
    predicted: float

    @property
    def avg_bits(self) -> float:
        return self.cost / self.weights


def allocate(sens: dict[str, dict[int, float]], costs: dict[str, dict[int, int]], weights: int,
             avg_bits: float) -> Allocation:
    """Greedy multiple-choice knapsack (see the module docstring): a width per unit
    with total cost <= avg_bits * weights, minimising the summed sensitivity."""
    budget = avg_bits * weights
    pick = {u: min(c) for u, c in costs.items()}
    total = sum(costs[u][b] for u, b in pick.items())
    if total > budget:
        raise ConfigError(f"--avg-bits {avg_bits} is below the smallest allocation ({total / weights:.3f} bits per "
                          "weight with every layer at the narrowest of --bits-choices, scales counted): raise it")
    while True:
        best = None
        for u, b in pick.items():
            for b2, c2 in costs[u].items():
                extra = c2 - costs[u][b]
                if b2 <= b or total + extra > budget:
                    continue
                gain = sens[u][b] - sens[u][b2]
                if gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, u, b2, extra)
        if best is None:
            break
        _, u, b2, extra = best
        pick[u], total = b2, total + extra
    return Allocation(pick, total, weights, sum(sens[u][b] for u, b in pick.items()))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ||y - ref||^2 / ||ref||^2 (float64 scalar)."""
    y, ref = y.float(), ref.float()
    return ((y - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp(min=1e-12)).sum().double()


def measure_sensitivity(model: nn.Module, ids: torch.Tensor, targets: list[str], config: QuantConfig,
                        device=None, progress: bool = True, tokens: int | None = None,
                        ) -> dict[str, dict[int, float]]:
    """{unit: {width: mean relative layer-output error}} for every unit of `targets`
    (Linears inside decoder layers) and every width of config.bits_choices, on the first
    `tokens` (default SENSITIVITY_TOKENS) calibration tokens."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.no_grad(), fp32_products(device):
        return _sensitivity(model, ids, targets, config, device, progress, tokens)


def _sensitivity(model, ids, targets, config, device, progress, tokens) -> dict[str, dict[int, float]]:
    from .arch import decoder_layers
    from .sequential import batched, capture_inputs

    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    outside = [t for t in targets if not t.startswith(prefix)]
    if outside:
        raise ConfigError(f"--avg-bits allocates Linears inside decoder layers only; --ignore these: {outside[:5]}")
    n = max(1, min(len(ids), -(-(tokens or SENSITIVITY_TOKENS) // ids.shape[1])))
    inputs, kwargs = capture_inputs(model, layers, ids[:n], device)
    inputs = batched(inputs, 2048)
    count = sum(x.shape[0] * x.shape[1] for x in inputs)
    all_units = units(targets)
    sens: dict[str, dict[int, float]] = {}
    bar = tqdm(range(len(layers)), desc="sensitivity", unit="layer", disable=not progress)
    for i in bar:
        layer = layers[i].to(device)
        lp = f"{prefix}{i}."
        refs = [_first(layer(x, **kwargs)) for x in inputs]
        for unit, names in all_units.items():
            if not unit.startswith(lp):
                continue
            lins = {n: layer.get_submodule(n[len(lp):]) for n in names}
            saved = {n: lin.weight.data for n, lin in lins.items()}
            sens[unit] = {}
            try:
                for b in config.bits_choices:
                    scheme = replace(config.weights, bits=b)
                    for n, lin in lins.items():
                        res = rtn(saved[n], scheme, config.clip)
                        lin.weight.data = res.dequantize(scheme.group_size, saved[n].dtype)
                    err = sum(_rel_err(_first(layer(x, **kwargs)), r) for x, r in zip(inputs, refs))
                    sens[unit][b] = float(err) / count
            finally:
                for n, lin in lins.items():
                    lin.weight.data = saved[n]
        inputs = refs
        layers[i] = layer.to("cpu")
    return sens


def unit_costs(model: nn.Module, groups: dict[str, list[str]], config: QuantConfig) -> tuple[dict, int]:
    """({unit: {width: bits}}, quantized weight count) for the units of `groups`."""
    costs, weights = {}, 0
    for unit, names in groups.items():
        costs[unit] = {}
        for b in config.bits_choices:
            scheme = replace(config.weights, bits=b)
            total = 0
            for n in names:
                lin = model.get_submodule(n)
                scheme.check_layer(n, lin.out_features, lin.in_features)
                total += scheme_bits(scheme, lin.out_features, lin.in_features, lin.weight.element_size())
            costs[unit][b] = total
        weights += sum(model.get_submodule(n).weight.numel() for n in names)
    return costs, weights


def mixed_config(model: nn.Module, config: QuantConfig, ids: torch.Tensor, targets: list[str], device=None,
                 progress: bool = True, tokens: int | None = None) -> tuple[QuantConfig, dict]:
    """Measure, allocate, and return (config with `schemes` for every target, report)."""
    groups = units(targets)
    costs, weights = unit_costs(model, groups, config)
    sens = measure_sensitivity(model, ids, targets, config, device, progress, tokens)
    alloc = allocate(sens, costs, weights, config.avg_bits)
    schemes = {n: replace(config.weights, bits=alloc.bits[u]) for u, names in groups.items() for n in names}
    counts = {b: sum(1 for v in alloc.bits.values() if v == b) for b in config.bits_choices}
    log.info("mixed precision: %.4f bits per weight (budget %s) over %d units: %s", alloc.avg_bits,
             config.avg_bits, len(groups), ", ".join(f"w{b} x{c}" for b, c in counts.items() if c))
    report = {"avg_bits": round(alloc.avg_bits, 6), "budget": config.avg_bits, "predicted_loss": alloc.predicted,
              "units": {u: {"bits": alloc.bits[u], "linears": groups[u],
                            "sensitivity": {str(b): s for b, s in sens[u].items()}} for u in groups}}
    return replace(config, schemes=schemes), report


def blind_config(model: nn.Module, config: QuantConfig, targets: list[str]) -> tuple[QuantConfig, float]:
    """A sensitivity-blind allocation at config.avg_bits, the reference that the measured
    one is judged against: whole decoder layers at one width, `lo` = the widest of
    bits_choices whose uniform cost fits the budget and `hi` = the next wider, the number
    of layers at `hi` that brings the total nearest the budget (the weight_shape tensors
    may put it a hair above), spread evenly over the depth (at 3.75 bits with g64 scales:
    W4 and W3 alternating). Returns (config with schemes, bits per weight)."""
    groups = units(targets)
    costs, weights = unit_costs(model, groups, config)
    budget = config.avg_bits * weights
    layer_of = {u: int(re.search(r"\.(\d+)\.", u + ".").group(1)) for u in groups}
    depth = max(layer_of.values()) + 1
    total = {b: sum(c[b] for c in costs.values()) for b in config.bits_choices}
    fits = [b for b in config.bits_choices if total[b] <= budget]
    if not fits:
        raise ConfigError(f"--avg-bits {config.avg_bits} is below every uniform width of --bits-choices")
    lo = max(fits)
    wider = [b for b in config.bits_choices if b > lo]
    pick = {u: lo for u in groups}
    if wider:
        hi = wider[0]
        per_layer = [sum(costs[u][hi] - costs[u][lo] for u in groups if layer_of[u] == i) for i in range(depth)]
        def spread(k):
            return {i for i in range(depth) if (i + 1) * k // depth > i * k // depth}

        k = min(range(depth + 1), key=lambda k: abs(total[lo] + sum(per_layer[i] for i in spread(k)) - budget))
        chosen = spread(k)
        pick = {u: hi if layer_of[u] in chosen else lo for u in groups}
    schemes = {n: replace(config.weights, bits=pick[u]) for u, names in groups.items() for n in names}
    cost = sum(costs[u][pick[u]] for u in groups)
    return replace(config, schemes=schemes), cost / weights
