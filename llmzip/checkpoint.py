"""compressed-tensors "pack-quantized" checkpoints: save and load.

Saving writes the whole checkpoint to a hidden temporary directory next to the target
and renames it into place at the end, so an interrupted save never leaves a directory
that looks complete. Loading builds the model skeleton on the meta device, swaps in
QuantLinear modules and assigns the stored tensors directly: the full-precision
weights of quantized layers are never materialised.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, WeightScheme, parse_activations
from .errors import UserError
from .files import check_safetensors, open_safetensors, read_json
from .legacy import LEGACY_METHODS, LegacyFormatError, import_state
from .moe import prepare_experts
from .kernels import registry
from .quant_linear import QuantLinear, set_activations
from .surgery import linear_names, set_module

METADATA_FILE = "llmzip.json"
log = logging.getLogger("llmzip")


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete or in a format llmzip cannot load."""


def quantization_config(scheme: WeightScheme, ignored: list[str], actorder: str | None = None,
                        kv_fp8: bool = False, schemes: dict[str, WeightScheme] | None = None) -> dict:
    """The config.json `quantization_config` block, built with compressed-tensors' own
    schema so that its loaders (transformers, vLLM) read it as they expect.

    actorder: None, or "weight" (GPTQ act-order with static, contiguous groups; no
    g_idx). compressed-tensors >= 0.20 no longer accepts "group" (exported g_idx).
    kv_fp8: add the static per-tensor FP8 `kv_cache_scheme` (scales `k_scale`/`v_scale`
    on each self_attn, see llmzip.kv_cache.attach_fp8_scales).
    schemes: mixed precision, {Linear name: WeightScheme} for every quantized Linear:
    one config group per distinct scheme (narrowest first), whose targets are the exact
    names of its Linears, so that each Linear matches exactly one group."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def args(s: WeightScheme) -> QuantizationArgs:
        return QuantizationArgs(num_bits=s.bits, type="int", symmetric=s.symmetric, strategy=s.strategy,
                                group_size=s.group_size, actorder=actorder)

    if schemes:
        by_scheme: dict[WeightScheme, list[str]] = {}
        for name, s in schemes.items():
            by_scheme.setdefault(s, []).append(name)
        order = sorted(by_scheme, key=lambda s: (s.bits, s.group_size or 0, s.symmetric))
        groups = {f"group_{i}": QuantizationScheme(targets=sorted(by_scheme[s]), weights=args(s))
                  for i, s in enumerate(order)}
    else:
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args(scheme))}
    qc = QuantizationConfig(
        config_groups=groups,
        format="pack-quantized",
        quantization_status="compressed",
        ignore=sorted(ignored),
        kv_cache_scheme=QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False,
                                         symmetric=True) if kv_fp8 else None,
    )
    return qc.model_dump(exclude_none=True)


def check_output_dir(out_dir: str | Path) -> Path:
    """Fail early (before any long work) if `out_dir` cannot receive a checkpoint.

    An existing directory is only replaced if it is empty or an llmzip checkpoint.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is a file; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA_FILE).is_file():
        raise CheckpointError(f"output directory {out} exists and is not an llmzip checkpoint; choose another -o")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot create {out}: {parent} is a file")
    try:  # os.access says yes to root even where nothing can be created (/proc): try it
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise CheckpointError(f"cannot write to {out}: nothing can be created in {parent} ({e.strerror}); "
                              "choose another -o") from None
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` directories that a killed save of `out` left
    behind: only those whose PID is no longer running (never a live process's save in
    progress). Returns what was removed."""
    stale = []
    for d in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = d.name[len(out.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            stale.append(d)
    return stale


def save(model: nn.Module, tokenizer, out_dir: str | Path, qconfig: dict, metadata: dict) -> Path:
    """Write model (with QuantLinear modules), tokenizer, config and llmzip.json.

    qconfig: the `quantization_config` dict; metadata: written to llmzip.json.
    Refuses to overwrite an existing non-empty directory that is not an llmzip
    checkpoint.
    """
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.config.quantization_config = qconfig
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        for d in remove_stale_temp_dirs(out):  # the output is in place: leftovers of killed saves can go
            log.info("removed %s, left by an interrupted save", d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return out


@dataclass(frozen=True)
class LoadedScheme:
    """scheme: the scheme of a group that targets every Linear (None if none does);
    targets: (name or "re:" regex, scheme) of groups with explicit targets (mixed
    precision), which take precedence, as in compressed-tensors' own matching."""

    scheme: WeightScheme | None
    act_order: bool
    ignore: tuple[str, ...]
    targets: tuple[tuple[str, WeightScheme], ...] = ()

    def scheme_for(self, name: str) -> WeightScheme | None:
        """The scheme the Linear `name` is stored in, or None when it is not quantized."""
        for target, s in self.targets:
            if target == name or (target.startswith("re:") and re.match(target[3:], name)):
                return s
        return self.scheme

    def is_ignored(self, name: str) -> bool:
        if name in self.ignore:
            return True
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], name):
                    return True
            elif name == pattern or name.endswith("." + pattern):
                return True
        return False


def read_scheme(qc: dict) -> LoadedScheme:
    """Parse a compressed-tensors quantization_config we can execute."""
    if qc.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"quant_method {qc.get('quant_method')!r} is not supported: llmzip reads "
                              f"compressed-tensors, {' and '.join(LEGACY_METHODS)}")
    if qc.get("format") != "pack-quantized":
        raise CheckpointError(f"format {qc.get('format')!r} is not supported (need pack-quantized)")
    groups = list(qc.get("config_groups", {}).values())
    if not groups:
        raise CheckpointError("quantization_config has no config_groups")
    default, targets, act_order = None, [], False
    for group in groups:
        w = group.get("weights") or {}
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise CheckpointError(f"weights {w} are not int group/channel quantization")
        if group.get("input_activations"):
            raise CheckpointError("activation quantization is not supported")
        try:
            scheme = WeightScheme(
                bits=w["num_bits"],
                group_size=w.get("group_size") if w["strategy"] == "group" else None,
                symmetric=w.get("symmetric", True),
            )
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        act_order = act_order or w.get("actorder") == "group"
        for t in group.get("targets", []):
            if t == "Linear":
                if default is not None:
                    raise CheckpointError("two config groups target every Linear layer")
                default = scheme
            elif t[:1].isupper() and "." not in t and not t.startswith("re:"):
                raise CheckpointError(f"config group target {t!r}: llmzip reads 'Linear' or module names")
            else:
                targets.append((t, scheme))
    return LoadedScheme(default, act_order, tuple(qc.get("ignore", [])), tuple(targets))


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         activations: str = "fp16"):
    """Load an llmzip (or any compatible compressed-tensors) checkpoint, or an AutoGPTQ /
    GPTQModel (`quant_method: gptq`) or AutoAWQ GEMM (`quant_method: awq`) one, whose
    tensors are translated exactly into llmzip's (llmzip.legacy).

    Returns the model with QuantLinear modules, in eval mode, on `device`, each bound to its
    kernel there (llmzip.kernels.registry.bind: pass the device the model will run on, so
    that kernels are chosen and prepared once).
    dtype: compute dtype of the unquantized parts (default: the checkpoint's).
    activations: "fp8" (opt-in) quantizes each quantized layer's input per token to e4m3:
    W4A8 on FP8 tensor cores on a GPU that has them, emulated in plain torch elsewhere;
    "fp8-except=gate_proj,up_proj" does so except for the listed Linears (by their own name),
    which keep 16-bit inputs (config.parse_activations).
    """
    try:
        parse_activations(activations)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    raw = read_json(path / "config.json")
    if "quantization_config" not in raw:
        raise CheckpointError(f"{path} has no quantization_config; load it with transformers")
    qc = raw["quantization_config"]
    legacy = str(qc.get("quant_method", "")).lower() in LEGACY_METHODS
    loaded = None if legacy else read_scheme(qc)
    check_safetensors(path)  # a truncated file fails here, before the model is built
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prepare_experts(model)
    state = to_model_keys(model, _read_safetensors(path))
    if legacy:  # AutoGPTQ / AutoAWQ tensors -> llmzip's, exactly (llmzip.legacy)
        loaded, state = _import_legacy(model, qc, state, path)
    elif loaded.targets:  # explicit targets name checkpoint names: map them as the tensors were
        targets = to_model_keys(model, dict(loaded.targets))
        loaded = replace(loaded, targets=tuple(targets.items()))
    for name in linear_names(model):
        scheme = None if loaded.is_ignored(name) else loaded.scheme_for(name)
        if scheme is None:
            continue
        lin = model.get_submodule(name)
        ql = QuantLinear(
            lin.in_features, lin.out_features, scheme, lin.bias is not None,
            act_order=loaded.act_order, dtype=dtype, device="meta",
        )
        set_module(model, name, ql)
    if qc.get("kv_cache_scheme"):
        from .kv_cache import attention_modules

        for attn in attention_modules(model).values():  # placeholders that the checkpoint fills
            for name in ("k_scale", "v_scale"):
                attn.register_buffer(name, torch.empty(1, dtype=dtype, device="meta"))
    # assign=True takes the tensors as they are: cast floats (norms, embeddings, scales) first.
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: tensors missing {still_meta[:5]} / unexpected {result.unexpected_keys[:5]}"
        )
    model = model.to(device).eval()
    try:
        set_activations(model, activations)
    except ValueError as e:  # an except list naming no quantized Linear of this model
        raise CheckpointError(f"{path}: {e}") from None
    registry.bind(model)  # once, on the final device: repacking (if the kernel wants it) happens here
    return model


def _import_legacy(model: nn.Module, qc: dict, state: dict, path: Path):
    linears = {}
    for name in linear_names(model):
        lin = model.get_submodule(name)
        linears[name] = (lin.in_features, lin.out_features, lin.bias is not None)
    try:
        state, scheme, act_order, quantized = import_state(qc, state, linears)
    except LegacyFormatError as e:
        raise CheckpointError(f"{path}: {e}") from e
    ignore = tuple(n for n in linears if n not in set(quantized))
    return LoadedScheme(scheme, act_order, ignore), state


def to_model_keys(model: nn.Module, state: dict) -> dict:
    """Checkpoint names -> module names, by transformers' renamings for this architecture
    (e.g. Mixtral's `block_sparse_moe.` is `mlp.` in transformers >= 5); the inverse of
    what save_pretrained applies. Fusing converters are not applied: llmzip keeps experts
    as separate Linears."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # transformers < 5 stores module names as they are
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return state
    return {apply_renamings(k, renamings): v for k, v in state.items()}


def _renamings(model: nn.Module) -> list:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers < 5 stores module names as they are
        return []
    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


def checkpoint_names(model: nn.Module, names: dict) -> dict:
    """{module name: v} -> {name in the saved checkpoint: v}: save_pretrained's renamings
    for this architecture (e.g. Mixtral's `mlp.` is stored as `block_sparse_moe.`), so
    that config-group targets name what loaders (vLLM, transformers) see."""
    renamings = [r.reverse_transform() for r in reversed(_renamings(model))]
    if not renamings:
        return dict(names)
    from transformers.core_model_loading import apply_renamings

    return {apply_renamings(k, renamings): v for k, v in names.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors files")
    state = {}
    for f in files:
        with open_safetensors(f) as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k)
    return state


def read_metadata(path: str | Path) -> dict:
    f = Path(path) / METADATA_FILE
    return read_json(f) if f.is_file() else {}
