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
    "best": {"doc": "SignRound learned rounding fitted to the float model's outputs, 50 steps of 8 samples per "
                    "layer (the best measured rows at W4 g64 and W3 g64; about 30 minutes for SmolLM2-135M on 2 "
                    "AVX2 cores; --iters more or fewer)", "method": "signround", "iters": 50},
}


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
    for key in ("iters", "signround_batch"):
        if key in recipe and getattr(args, key, None) is None:
            setattr(args, key, recipe[key])
