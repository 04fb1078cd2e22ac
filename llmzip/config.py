"""Quantization settings as frozen, validated dataclasses.

A `QuantConfig` describes what the user asked for (method, bits, grouping, ...).
`WeightScheme` is the per-layer view of it that algorithms, packing and kernels read.
Every check raises `ConfigError` with a message that names the problem and the fix.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .errors import UserError

# A calibrated method is a recipe of steps run on each decoder layer in order: optional
# transforms of the float layer (SMOOTHERS), then one rounding step (ROUNDERS). The
# steps themselves live in llmzip/steps/; "awq" alone is AWQ then RTN.
SMOOTHERS = ("awq",)
ROUNDERS = ("rtn", "gptq", "signround")
METHODS = ("rtn", "gptq", "awq", "awq+gptq", "signround", "awq+signround")
CALIBRATED = tuple(m for m in METHODS if m != "rtn")
MIN_BITS, MAX_BITS = 2, 8
# Linear layers that stay in full precision unless the user says otherwise.
DEFAULT_IGNORE = (r"(^|\.)lm_head$",)


class ConfigError(UserError):
    """A quantization setting is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class WeightScheme:
    """How one weight matrix [out, in] is quantized.

    bits: 2..8. Codes are signed integers in [-2^(bits-1), 2^(bits-1) - 1].
    group_size: number of consecutive input columns that share a scale; None means
        one scale per output channel (per-channel).
    symmetric: True -> dequant = q * scale; False -> dequant = (q - zero) * scale.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"bits={self.bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS}"
            )
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise ConfigError(
                f"group_size={self.group_size!r} is invalid: use a positive integer, "
                "or None (-1 on the command line) for per-channel scales"
            )

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        """Raise ConfigError if this scheme cannot quantize a [out, in] weight."""
        g = self.group_size
        if g is not None and in_features % g != 0:
            good = [d for d in (32, 64, 128, 256) if in_features % d == 0]
            hint = f"group sizes that divide it: {', '.join(map(str, good))}" if good else (
                "no power-of-two group size divides it"
            )
            raise ConfigError(
                f"layer '{name}': group size {g} does not divide its {in_features} input "
                f"features ({hint}; or use --group-size -1 for per-channel, or --ignore the layer)"
            )


@dataclass(frozen=True)
class ClipSearch:
    """MSE-optimal clipping: try shrinking the range by each ratio in a grid and keep,
    per group, the ratio with the lowest squared reconstruction error.

    grid: number of ratios tried, evenly spaced in [min_ratio, 1].
    norm: exponent of the error (2.0 = MSE; 2.4 as in some AWQ/GPTQ tools).
    signed: symmetric schemes also try each ratio with the range's larger end mapped onto
        qmin (a negative scale where that end is positive: primitives.signed_qparams),
        which gives that side all 2^b levels, as llama.cpp's Q4_0 does.
    refit: symmetric schemes then refit the chosen scale this many times by least
        squares for its codes (the scale minimising the error for fixed codes), keeping
        each refit only where it lowers the error.
    """

    grid: int = 20
    min_ratio: float = 0.5
    norm: float = 2.0
    signed: bool = True
    refit: int = 2

    def __post_init__(self):
        if self.grid < 1:
            raise ConfigError(f"clip grid={self.grid} must be at least 1")
        if not 0.0 < self.min_ratio <= 1.0:
            raise ConfigError(f"clip min_ratio={self.min_ratio} must be in (0, 1]")
        if self.norm <= 0:
            raise ConfigError(f"clip norm={self.norm} must be positive")
        if self.refit < 0:
            raise ConfigError(f"clip refit={self.refit} must be 0 or more")

    def ratios(self) -> list[float]:
        if self.grid == 1:
            return [1.0]
        step = (1.0 - self.min_ratio) / (self.grid - 1)
        return [1.0 - i * step for i in range(self.grid)]


@dataclass(frozen=True)
class GPTQSettings:
    """damp: fraction of the mean Hessian diagonal added to the diagonal; raised x10
    (up to max_damp) when the Cholesky factorisation fails.
    act_order: quantize columns in order of decreasing Hessian diagonal.
    static_groups: with act_order, fix group parameters from the unmodified weight in
    natural column order, so groups stay contiguous and no g_idx is needed.
    true_sequential: inside each decoder layer, quantize the Linears group by group in
    the order the forward pass uses them (Linears reading the same input form a group:
    q/k/v, then o, then gate/up, then down) and collect each group's Hessian with the
    groups before it already quantized. Costs one extra pass over the calibration set
    per group.
    scale_refit: after rounding, this many rounds of: refit every group's scale by least
    squares on the layer-output error for the codes chosen (the normal equations of
    tr(E H E^T), which see H's cross-group terms), then round again onto those scales;
    each output row keeps the candidate with the lowest output error. Each round costs
    about one more GPTQ solve."""

    damp: float = 0.01
    max_damp: float = 10.0
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = False
    scale_refit: int = 0

    def __post_init__(self):
        if self.scale_refit < 0:
            raise ConfigError(f"GPTQ scale_refit={self.scale_refit} must be 0 or more")
        if not 0 < self.damp <= self.max_damp:
            raise ConfigError(f"GPTQ damp={self.damp} must be in (0, max_damp={self.max_damp}]")
        if self.block_size < 1:
            raise ConfigError(f"GPTQ block_size={self.block_size} must be positive")
        if self.static_groups and not self.act_order:
            raise ConfigError("static groups only apply with act-order: add --act-order")


@dataclass(frozen=True)
class AWQSettings:
    """grid: alphas tried for the scale search (alpha = i / grid, i < grid; 0 = RTN).
    clip: also search per-group clipping ratios on the output error (clip_grid ratios
    in [0.5, 1]); not for q/k projections. max_tokens / clip_tokens: activation rows
    (evenly strided over the calibration set) used by the two searches."""

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_tokens: int = 4096
    clip_tokens: int = 512

    def __post_init__(self):
        if self.grid < 1 or self.clip_grid < 1 or self.max_tokens < 1 or self.clip_tokens < 1:
            raise ConfigError(f"AWQ settings must be positive: {self}")


SIGNROUND_LOSSES = ("mse", "relative")
SIGNROUND_TARGETS = ("model", "layer")


@dataclass(frozen=True)
class SignRoundSettings:
    """SignRound (Cheng et al., 2023; AutoRound): learned rounding offsets V in
    [-0.5, 0.5] and per-group range factors in [min_clip, 1], fitted per decoder layer
    by signed gradient descent on the block-output MSE.

    iters: steps per layer (AutoRound's default recipe: 200; its "light" one: 50).
    lr: step size of the sign updates, decaying linearly to 0 (None = 1 / iters,
        AutoRound's default). batch: calibration samples per step (AutoRound: 8).
    minmax: also learn the range factors (AutoRound's enable_minmax_tuning).
    seed: draws the samples of each step (per layer, so a resumed run is identical).
    loss: "mse", the block-output MSE over all tokens (AutoRound's), or "relative":
        each token's squared error divided by its float output's squared norm, then
        averaged. The next layer sees each token through its RMSNorm, i.e. relative to
        the token's norm; the plain MSE is instead dominated by the few tokens with
        massive activations (bench/results/massive_activations.md). Measured much worse
        than "mse" at W2 g64 on SmolLM2 (bench/results/calibrated_peers.md).
    target: what each layer's quantized output is fitted to. "model": the float
        model's own hidden states after this layer (a second, float stream of the
        calibration activations is carried through the layers), so each layer also
        makes up for the error the quantized layers before it left in its inputs
        (AutoRound's; it holds a second copy of the calibration activations). "layer":
        the float layer's output on the same quantized inputs, which fits each layer's
        own error only. Measured at W4 g64 on SmolLM2, 50 steps: 1.124x bf16 perplexity
        with "model", 1.172x with "layer" (bench/results/calibrated_peers.md)."""

    iters: int = 200
    lr: float | None = None
    batch: int = 8
    minmax: bool = True
    min_clip: float = 0.5
    seed: int = 0
    loss: str = "mse"
    target: str = "model"

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ConfigError(f"SignRound iters={self.iters!r} must be a non-negative integer (--iters)")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"SignRound lr={self.lr!r} must be positive, or None for 1/iters")
        if self.batch < 1:
            raise ConfigError(f"SignRound batch={self.batch!r} must be at least 1")
        if not 0.0 < self.min_clip <= 1.0:
            raise ConfigError(f"SignRound min_clip={self.min_clip!r} must be in (0, 1]")
        if self.loss not in SIGNROUND_LOSSES:
            raise ConfigError(f"SignRound loss={self.loss!r} must be one of {', '.join(SIGNROUND_LOSSES)} "
                              "(--signround-loss)")
        if self.target not in SIGNROUND_TARGETS:
            raise ConfigError(f"SignRound target={self.target!r} must be one of {', '.join(SIGNROUND_TARGETS)} "
                              "(--signround-target)")

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)


@dataclass(frozen=True)
class TuneSettings:
    """End-to-end scale tuning after the layer-by-layer calibration (llmzip.tuning):
    every group scale is fitted, codes fixed, to the float model's next-token
    distribution on the calibration tokens.

    epochs: passes over the calibration samples (0: off). lr: Adam's step size on the
        log of each scale's gain, decaying to 0 on a cosine; None: by each Linear's width,
        `lr_for(bits)`. batch: samples per step. seed: the order of the samples."""

    epochs: int = 0
    lr: float | None = None
    batch: int = 4
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"tune epochs={self.epochs!r} must be a non-negative integer (--tune-epochs)")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"tune lr={self.lr!r} must be positive (--tune-lr)")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"tune batch={self.batch!r} must be at least 1")

    def lr_for(self, bits: int) -> float:
        """The step size for the scales of a `bits`-wide Linear: --tune-lr when given,
        else 1e-2 below 4 bits and 3e-3 from 4 bits up. Measured on SmolLM2-135M after 50
        SignRound steps (bench/results/calibrated_peers.md): 3e-3 improves on the
        calibrated scales at W4 g64 in ppl, KLD and top-1, while at W2 g64 1e-2 took
        the model from 5.84x to 4.14x bf16."""
        if self.lr is not None:
            return self.lr
        return 1e-2 if bits < 4 else 3e-3


def recipe_steps(method: str) -> tuple[str, ...]:
    """The per-layer steps of a calibrated method: 'awq+gptq' -> ('awq', 'gptq'), and
    'awq' -> ('awq', 'rtn') (smoothing alone ends in round-to-nearest)."""
    parts = tuple(method.split("+"))
    return parts + ("rtn",) if parts[-1] in SMOOTHERS else parts


def clip_by_default(method: str) -> bool:
    """Whether `method` searches clipped ranges unless told otherwise (QuantConfig.clip)."""
    return method == "gptq"


@dataclass(frozen=True)
class QuantConfig:
    """Everything `llmzip.quantize` needs to know.

    method: "rtn" (round-to-nearest, no data), or a calibrated method: "gptq",
        "awq" (activation-aware scales + clipping, then RTN), "awq+gptq" (AWQ scales,
        then GPTQ rounding), "signround" (learned rounding, `signround` settings),
        "awq+signround".
    weights: the WeightScheme applied to every quantized Linear.
    clip: range clipping search, None for plain min/max ranges, or "auto" (the
        default): on for "gptq", whose search weighs each candidate by the layer-output
        error e H e^T; off for "rtn" (its search is on weight MSE, opt in) and for the
        AWQ methods (AWQ runs its own output-aware clip search, `AWQSettings.clip`).
    ignore: regexes (re.search on the module name) of Linears kept in full precision.
        Embeddings are never quantized (they are not Linear layers).
    rotate: None, or "hadamard": fold a seeded random Hadamard rotation (rotate_seed) of
        the residual stream and of each head's values into the float weights before
        quantizing (llmzip.rotation); the model computes the same function.
    avg_bits: None, or a budget of bits per quantized weight, scales and zero points
        counted as `llmzip info` counts them: each Linear then gets one of bits_choices
        (with `weights`' group size and symmetry), allocated by measured sensitivity
        (llmzip.mixed); the result is stored in `schemes`.
    schemes: {Linear name: WeightScheme} overriding `weights` for those Linears
        (scheme_for); filled by the avg_bits allocation, or given explicitly.
    """

    method: str = "rtn"
    weights: WeightScheme = field(default_factory=WeightScheme)
    clip: ClipSearch | None | str = "auto"
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    awq: AWQSettings = field(default_factory=AWQSettings)
    signround: SignRoundSettings = field(default_factory=SignRoundSettings)
    tune: TuneSettings = field(default_factory=TuneSettings)
    kv_cache: str | None = None  # "fp8": calibrate static FP8 K/V scales and export them
    rotate: str | None = None  # "hadamard": rotate the float model first (llmzip.rotation)
    rotate_seed: int = 0
    avg_bits: float | None = None
    bits_choices: tuple[int, ...] = (2, 3, 4, 8)
    schemes: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "bits_choices", tuple(sorted(set(self.bits_choices))))
        bad = [b for b in self.bits_choices if not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS]
        if bad or not self.bits_choices:
            raise ConfigError(f"--bits-choices {list(self.bits_choices)}: use integers from {MIN_BITS} to {MAX_BITS}")
        if self.avg_bits is not None and not self.avg_bits > 0:
            raise ConfigError(f"--avg-bits {self.avg_bits!r} must be a positive number of bits per weight")
        for name, s in self.schemes.items():
            if not isinstance(s, WeightScheme):
                raise ConfigError(f"schemes[{name!r}] must be a WeightScheme, not {s!r}")
        if self.rotate not in (None, "hadamard"):
            raise ConfigError(f"rotate {self.rotate!r} is not available: use 'hadamard' or leave it out")
        if self.kv_cache not in (None, "fp8"):
            raise ConfigError(f"kv_cache {self.kv_cache!r}: the only calibrated KV cache scheme is 'fp8' "
                              "(int8/int4 caches are dynamic and need no calibration)")
        if self.method not in METHODS:
            raise ConfigError(
                f"method '{self.method}' is not available: choose one of {', '.join(METHODS)}"
            )
        if self.tune.epochs and self.method not in CALIBRATED:
            raise ConfigError(f"--tune-epochs fits the scales on calibration data after a calibrated method; "
                              f"'{self.method}' reads none: use --method gptq, awq or signround")
        if self.clip == "auto":
            object.__setattr__(self, "clip", ClipSearch() if clip_by_default(self.method) else None)
        elif not (self.clip is None or isinstance(self.clip, ClipSearch)):
            raise ConfigError(f"clip={self.clip!r}: use a ClipSearch, None or 'auto'")
        if self.clip is not None and "signround" in recipe_steps(self.method):
            raise ConfigError("--clip-search does not apply to signround, which learns its own per-group range "
                              "factors: drop --clip-search")
        if isinstance(self.ignore, (list, str)):
            object.__setattr__(
                self, "ignore", (self.ignore,) if isinstance(self.ignore, str) else tuple(self.ignore)
            )
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"--ignore pattern {pattern!r} is not a valid regex: {e}") from e

    @property
    def steps(self) -> tuple[str, ...]:
        """Per-layer steps of a calibrated method (recipe_steps)."""
        return recipe_steps(self.method)

    @property
    def uses_awq(self) -> bool:
        return "awq" in self.steps

    @property
    def float_stream(self) -> bool:
        """Whether calibration carries the float model's hidden states beside the
        quantized ones: SignRound fits to them (SignRoundSettings.target == "model"), and
        the end-to-end scale tuning (tune.epochs) takes its targets from the last layer's."""
        return ("signround" in self.steps and self.signround.target == "model") or self.tune.epochs > 0

    @property
    def uses_gptq(self) -> bool:
        return "gptq" in self.steps

    def scheme_for(self, name: str) -> WeightScheme:
        """The WeightScheme of the Linear called `name` (full module name)."""
        return self.schemes.get(name, self.weights)

    def is_ignored(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.ignore)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        clip = d.get("clip")
        return cls(
            method=d["method"],
            weights=WeightScheme(**d["weights"]),
            clip=ClipSearch(**clip) if clip else None,
            ignore=tuple(d.get("ignore", DEFAULT_IGNORE)),
            gptq=GPTQSettings(**d.get("gptq", {})),
            awq=AWQSettings(**d.get("awq", {})),
            signround=SignRoundSettings(**d.get("signround", {})),
            tune=TuneSettings(**d.get("tune", {})),
            kv_cache=d.get("kv_cache"),
            rotate=d.get("rotate"),
            rotate_seed=d.get("rotate_seed", 0),
            avg_bits=d.get("avg_bits"),
            bits_choices=tuple(d.get("bits_choices", (2, 3, 4, 8))),
            schemes={n: WeightScheme(**s) for n, s in d.get("schemes", {}).items()},
        )


ACTIVATIONS = ("fp16", "fp8")  # "fp16": the model's 16-bit dtype as is; "fp8": per-token e4m3 (W4A8)
EXCEPT = "fp8-except="  # "fp8-except=gate_proj,up_proj": fp8, but those Linears keep 16-bit inputs


def parse_activations(spec: str) -> tuple[str, frozenset]:
    """An activations spec -> (mode, names of Linears that keep 16-bit inputs).
    "fp16" and "fp8" apply to every quantized Linear; "fp8-except=NAME[,NAME...]" is fp8 except
    for the Linears whose own name (the last part of the module path, e.g. gate_proj) is listed.
    Raises ValueError on anything else."""
    if spec in ACTIVATIONS:
        return spec, frozenset()
    names = frozenset(n.strip() for n in spec[len(EXCEPT):].split(",") if n.strip()) if spec.startswith(EXCEPT) \
        else frozenset()
    if not names:
        raise ValueError(f"activations must be one of {ACTIVATIONS} or {EXCEPT}NAME[,NAME...] "
                         f"(e.g. {EXCEPT}gate_proj,up_proj), not {spec!r}")
    return "fp8", names
