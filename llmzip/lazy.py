"""Loading a model's weights one piece at a time, for quantizing models larger than RAM.

`load_lazy` builds the model skeleton on the meta device (accelerate's
`init_empty_weights`; no memory for weights) and loads only what lives outside the
decoder layers (embeddings, final norm, head). `LazyWeights.materialize(module)` then
reads that module's tensors from the memory-mapped safetensors files just before it is
quantized. The quantizers call it layer by layer, so the full-precision model is never
in memory at once: host RAM holds the quantized layers done so far, one full-precision
layer, the calibration activations and the embeddings.

Checkpoint names are mapped to module names with transformers' renamings for the
architecture (llmzip.checkpoint.to_model_keys); MoE experts are kept per expert
(llmzip.moe), which is how checkpoints store them, so no fusing is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import FileFormatError
from .files import open_safetensors


class LazyWeights:
    """Index of tensor name -> safetensors file for one checkpoint directory."""

    def __init__(self, path: Path, model: nn.Module, dtype: torch.dtype):
        from .checkpoint import to_model_keys

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .safetensors files")
        where = {}
        for f in files:
            with open_safetensors(f) as fh:
                for k in fh.keys():
                    where[k] = (f, k)
        self.where = to_model_keys(model, where)  # module name -> (file, checkpoint name)
        self.dtype = dtype
        self.path = Path(path)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors for module names (views of the file mappings), each file opened once."""
        missing = [n for n in names if n not in self.where]
        if missing:
            raise FileFormatError(f"{self.path} has no tensor for {missing[0]}: its weights are incomplete; "
                                  "restore them, or re-create / re-download the model")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n][0], []).append(n)
        out = {}
        for f, group in by_file.items():
            with open_safetensors(f) as fh:
                for n in group:
                    out[n] = fh.get_tensor(self.where[n][1])
        return out

    @torch.no_grad()
    def materialize(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """Replace every meta parameter/buffer under `module` (whose full name starts with
        `prefix`) by its tensor from the checkpoint, cast to the model dtype when floating."""
        todo = list(_meta_tensors(module, recurse))
        tensors = self._read([prefix + full for full, _ in todo])
        for full, sub in todo:
            owner_name, _, attr = full.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            t = tensors.pop(prefix + full)
            # A copy, never a view of the file mapping: a view would keep the whole
            # mapping alive and every page ever read resident.
            t = t.to(self.dtype if t.is_floating_point() else t.dtype, copy=True)
            if isinstance(sub, nn.Parameter):
                setattr(owner, attr, nn.Parameter(t, requires_grad=False))
            else:
                owner._buffers[attr] = t



def _meta_tensors(module: nn.Module, recurse: bool = True):
    for n, p in module.named_parameters(recurse=recurse, remove_duplicate=False):
        if p.is_meta:
            yield n, p
    for n, b in module.named_buffers(recurse=recurse, remove_duplicate=False):
        if b is not None and b.is_meta:
            yield n, b


def load_lazy(path: str | Path, dtype: torch.dtype | None, layers_attr=None, trust_remote_code: bool = False):
    """(model, tokenizer, LazyWeights) with everything but the decoder layers loaded.

    layers_attr: function model -> dotted path of its decoder layer list (llmzip.arch);
    None loads nothing eagerly but non-Linear modules, so RTN can stream Linear by Linear."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .moe import prepare_experts

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    prepare_experts(model)
    lazy = LazyWeights(Path(path), model, dtype)
    layers = model.get_submodule(layers_attr(model)) if layers_attr else None
    for name, mod in model.named_children():
        _materialize_outside(lazy, mod, name + ".", layers)
        model.tie_weights()  # a tied head now shares the loaded embeddings
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tok, lazy


def _materialize_outside(lazy: LazyWeights, module: nn.Module, prefix: str, layers) -> None:
    """Materialize `module` except the decoder layer list (and, when layers is None, Linears)."""
    if module is layers or (layers is None and isinstance(module, nn.Linear)):
        return
    lazy.materialize(module, prefix, recurse=False)
    for name, child in module.named_children():
        _materialize_outside(lazy, child, prefix + name + ".", layers)
