"""`llmzip quantize --recipe fast|default|best`: named presets of method and settings.

Each recipe fills in the quantize options the user did not give; it never overrides
an explicit one, and it cannot be combined with --method. Measured on SmolLM2-135M
(bench/results/signround_smollm2.md, bench/results/calibrated_peers.md).
"""

from __future__ import annotations

from .config import ConfigError

RECIPES = {
    "fast": {"doc": "round-to-nearest, no calibration data (seconds)", "method": "rtn"},
    "default": {"doc": "GPTQ with act-order and clip search (minutes)", "method": "gptq", "act_order": True},
    "best": {"doc": "SignRound learned rounding fitted to the float model's outputs, 8 samples per step: 40 steps "
                    "per layer at 4 bits and more (about 19 minutes for SmolLM2-135M on 2 AVX2 cores); below 4 "
                    "bits or with --avg-bits, 50 steps and then one epoch of end-to-end scale tuning "
                    "(--iters, --tune-epochs change them)", "method": "signround",
             "iters": {"low_bits": 50, "high_bits": 40}, "tune_epochs": {"low_bits": 1, "high_bits": 0}},
}
# "iters" of a recipe: one number, or {"low_bits": n, "high_bits": m}: m when every quantized weight
# gets HIGH_BITS or more (plain --bits, no --avg-bits), n otherwise. On SmolLM2-135M (2 AVX2 cores),
# 40 steps at W4 g64 took 1141 s (1.136x bf16; 50 steps scored 1.124x), and 50 steps at W2 g64 asym,
# the same work per layer, took 1316 s, over a 20-minute budget; below 4 bits, 50 are what was
# measured (bench/results/calibrated_peers.md). One epoch of --tune-epochs after them took W2 g64
# from 5.84x to 4.14x bf16; at 4 bits it would break the 20-minute budget, and it is unmeasured there.
HIGH_BITS = 4


def apply_recipe(args) -> None:
    """Fill args.method (and what the recipe sets) from args.recipe; plain rtn without one."""
    if args.recipe is None:
        args.method = args.method or "rtn"
        return
    if args.method is not None:
        raise ConfigError(f"--recipe {args.recipe} chooses the method itself: drop --method {args.method}, "
                          "or drop --recipe")
    recipe = RECIPES[args.recipe]
    args.method = recipe["method"]
    if recipe.get("act_order"):
        args.act_order = True
    for key in ("iters", "signround_batch", "tune_epochs"):
        if key in recipe and getattr(args, key, None) is None:
            value = recipe[key]
            if isinstance(value, dict):
                high = getattr(args, "avg_bits", None) is None and getattr(args, "bits", 4) >= HIGH_BITS
                value = value["high_bits" if high else "low_bits"]
            setattr(args, key, value)
