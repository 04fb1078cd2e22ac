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
    "best": {"doc": "SignRound learned rounding fitted to the float model's outputs, 50 steps per layer of 8 "
                    "samples, then one epoch of end-to-end scale tuning (about 12 minutes for SmolLM2-135M at W4 "
                    "g64 on 2 Xeon cores with AMX; --iters, --tune-epochs change them)", "method": "signround",
             "iters": 50, "tune_epochs": 1},
}
# `best` is the strongest setting measured on SmolLM2-135M (bench/results/calibrated_peers.md, 128 x 512
# calibration, 16 x 2048 wiki tokens): 50 SignRound steps, then one epoch of --tune-epochs at the
# step size for each width (TuneSettings.lr_for). W4 g64: 1.111x bf16 (KLD 0.131) against 1.124x
# (KLD 0.135) for the 50 steps alone and 1.136x for 40; W2 g64: 4.14x against 5.84x. Two epochs
# scored worse than one at W2 g64 (4.24x). The W4 g64 run took 725 s on 2 Xeon cores with AMX; on an
# AVX2 EPYC the 50 steps alone took 1893 s.


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
            setattr(args, key, recipe[key])
