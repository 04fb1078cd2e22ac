"""The kernel registry's API: one entry per variant with a typed state, the per-call row
choice of cpu_int4 in named constants, and kernels chosen once after the final placement."""

import dataclasses

import pytest
import torch
from helpers import tiny_llama
from test_kernels import K, layer

import llmzip
from llmzip.config import QuantConfig, WeightScheme
from llmzip.kernels import cpu_int4, cpu_int4_amx, cpu_int4_dense, cpu_int4_torch, reference, registry
from llmzip.kernels.base import LayerSpec
from llmzip.kernels.triton_entries import TritonState
from llmzip.quant_linear import QuantLinear

QUANT_LINEARS = 14  # tiny_llama: 2 decoder layers x 7 Linears (the LM head stays dense)


def test_row_thresholds_are_named_constants():
    assert (cpu_int4.DENSE_FROM, cpu_int4.DENSE_WEIGHTS_PER_ROW) == (72, 65536)
    assert cpu_int4.dense_from(layer(k=4096, n=4096)) == 256  # 4096 * 4096 / 65536
    assert cpu_int4.dense_from(layer(n=80)) == cpu_int4.DENSE_FROM


def _state(amx: bool, dense: bool) -> cpu_int4.CpuInt4State:
    return cpu_int4.CpuInt4State(torch_int4=None, amx=object() if amx else None, dense=object() if dense else None,
                                 dense_from=cpu_int4.DENSE_FROM)


@pytest.mark.parametrize("amx,dense,dtype,rows,variant", [
    (False, True, torch.bfloat16, cpu_int4.DENSE_FROM - 1, "cpu_int4_torch"),
    (False, True, torch.bfloat16, cpu_int4.DENSE_FROM, "cpu_int4_dense"),
    (False, True, torch.float16, 1, "cpu_int4_torch"),
    (False, False, torch.float16, cpu_int4.DENSE_FROM, "reference"),  # act-order: no byte-order dense path
    (False, True, torch.float32, 1, "reference"),
    (True, True, torch.bfloat16, 1, "cpu_int4_amx"),
    (True, True, torch.bfloat16, 4096, "cpu_int4_amx"),
    (True, True, torch.float16, cpu_int4.DENSE_FROM - 1, "cpu_int4_torch"),
    (True, True, torch.float16, cpu_int4.DENSE_FROM, "cpu_int4_dense"),
    (True, True, torch.float32, 4096, "reference"),
])
def test_cpu_int4_routes_each_call_by_dtype_and_rows(amx, dense, dtype, rows, variant):
    assert _state(amx, dense).route(rows, dtype) == variant
    assert variant in registry.entries()


def test_routes_describe_the_choice():
    assert cpu_int4.routes(_state(False, True)) == {
        "bfloat16": "cpu_int4_torch below 72 rows, cpu_int4_dense from 72",
        "float16": "cpu_int4_torch below 72 rows, cpu_int4_dense from 72",
        "float32": "reference (any rows)"}
    assert cpu_int4.routes(_state(True, False))["bfloat16"] == "cpu_int4_amx (any rows)"


@pytest.mark.parametrize("entry,state_type", [
    (registry.REFERENCE, reference.ReferenceState), (registry.CPU_INT4, cpu_int4.CpuInt4State),
    (registry.CPU_INT4_TORCH, cpu_int4_torch.TorchInt4State), (registry.CPU_INT4_DENSE, cpu_int4_dense.DenseState),
    (registry.TRITON, TritonState), (registry.TRITON_W4A8, TritonState)])
def test_each_entry_prepares_a_typed_state(entry, state_type):
    state = entry.prepare(layer(group=64, n=80, dtype=torch.bfloat16))
    assert type(state) is state_type and dataclasses.is_dataclass(state)


def test_every_entry_is_named_once():
    names = [k.name for k in registry.KERNELS + registry.VARIANTS]
    assert len(names) == len(set(names)) == len(registry.entries())
    assert {"cpu_int4_amx", "cpu_int4_torch", "cpu_int4_dense", "cpu_int4", "triton", "triton_w4a8",
            "reference"} <= set(names)


@pytest.mark.parametrize("rows,variant", [(3, "cpu_int4_torch"), (cpu_int4.DENSE_FROM, "cpu_int4_dense"),
                                          (cpu_int4.DENSE_FROM + 8, "cpu_int4_dense")])
def test_a_forced_variant_gives_the_bits_cpu_int4_routes_to_it(rows, variant, monkeypatch):
    """cpu_int4 delegates: the variant it routes to, bound alone ($LLMZIP_KERNEL), returns the same bits."""
    monkeypatch.setattr(cpu_int4_amx, "available", lambda: False)
    m = layer(group=64, symmetric=False, n=80, dtype=torch.bfloat16)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).bfloat16()
    registry.bind_layer(m)
    assert m.kernel_name == "cpu_int4" and m.kernel_state.route(rows, x.dtype) == variant
    routed = m(x)
    monkeypatch.setenv("LLMZIP_KERNEL", variant)
    m.select_kernel()
    assert m.kernel_name == variant
    assert torch.equal(m(x), routed)


def _count_selections(monkeypatch) -> list:
    """Each real selection (a layer not bound to its current tensors) walks the kernel order once."""
    calls = []
    order = registry._order
    monkeypatch.setattr(registry, "_order", lambda: calls.append(1) or order())
    return calls


def test_load_binds_once_and_placing_again_keeps_the_kernels(tmp_path, monkeypatch):
    llmzip.quantize(tiny_llama(), QuantConfig(weights=WeightScheme(4, 32)), output_dir=tmp_path / "q",
                    progress=False)
    calls = _count_selections(monkeypatch)
    model = llmzip.load(tmp_path / "q", device="cpu")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len(calls) == QUANT_LINEARS
    states = [m.kernel_state for m in layers]
    model = model.to("cpu")  # the final placement, as the server makes it: nothing moves
    registry.bind(model)
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 5)))
    assert len(calls) == QUANT_LINEARS and all(m.kernel_state is s for m, s in zip(layers, states))
    model.float()  # the scales are cast: every state is stale
    assert all(m.kernel is None for m in layers)
    choices = registry.bind(model)
    assert len(calls) == 2 * QUANT_LINEARS and set(choices) == {n for n, m in model.named_modules()
                                                                if isinstance(m, QuantLinear)}


def test_server_build_binds_each_layer_once(tmp_path, monkeypatch):
    """build_engine: load binds on the final device, the server's bind keeps it, and the
    serving pass binds only the Linears it fuses (the originals are unbound, not re-prepared)."""
    from helpers import tiny_model, tiny_tokenizer

    from llmzip.serve.server import build_engine

    tok = tiny_tokenizer()
    llmzip.quantize(tiny_model(tok, 256, torch.bfloat16), QuantConfig(weights=WeightScheme(4, 32)),
                    output_dir=tmp_path / "q", progress=False)
    tok.save_pretrained(tmp_path / "q")
    calls = _count_selections(monkeypatch)
    engine = build_engine(str(tmp_path / "q"), max_num_seqs=2, max_model_len=64, kv_dtype="auto", device="cpu")
    fused = [m for layer in engine.lean.layers for m in (layer.qkv, layer.gate_up) if isinstance(m, QuantLinear)]
    assert len(fused) == 4 and all(m.kernel is not None for m in fused)
    assert len(calls) == QUANT_LINEARS + len(fused)


def test_input_on_another_device_is_a_clear_error():
    m = layer(n=80, dtype=torch.bfloat16)
    registry.bind_layer(m)
    with pytest.raises(registry.WrongDevice, match="input on meta, but this layer is bound on cpu"):
        m(torch.empty(2, K, device="meta", dtype=torch.bfloat16))


def test_an_unbound_layer_binds_once_on_its_first_call(monkeypatch):
    calls = _count_selections(monkeypatch)
    m = layer(n=80, dtype=torch.bfloat16)
    x = torch.randn(2, K).bfloat16()
    for _ in range(3):
        m(x)
    assert len(calls) == 1 and m.kernel_name == "cpu_int4"


def test_info_shows_what_runs_per_dtype():
    from llmzip.info import format_kernel_report

    m = torch.nn.Sequential(layer(group=64, n=80, dtype=torch.bfloat16))
    report = {"device": "cpu", "layers": registry.bind(m)}
    text = format_kernel_report(report)
    state = m[0].kernel_state
    assert f"float16 activations run {cpu_int4.routes(state)['float16']}" in text
    assert "float32 activations run reference (any rows)" in text


def test_select_kernel_still_answers_from_the_spec_alone():
    spec = LayerSpec(4, 64, True, False, 192, 80)
    kernel, refused = registry.select_kernel(spec, torch.device("cpu"))
    assert kernel.name == "cpu_int4" and "CUDA" in refused["triton"]


def test_fp16_beside_amx_packs_for_torch_from_the_amx_layout(monkeypatch):
    """Where AMX holds the codes, cpu_int4 builds torch's int4 packing from the AMX layout on
    the first fp16 call: the same bits as the torch int4 entry built from the codes
    (AMX itself is not called: fp16 never routes to it)."""
    monkeypatch.setattr(cpu_int4_amx, "runs", lambda n, k, group: True)
    m = layer(group=32, symmetric=False, act_order="uniform", n=80, dtype=torch.bfloat16)
    state = cpu_int4.prepare(m)
    assert state.amx is not None and state.torch_int4.packed is None
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(5)).half()
    y = cpu_int4.linear(x, m, state)
    assert state.torch_int4.packed is not None
    assert torch.equal(y, cpu_int4_torch.linear(x, m, cpu_int4_torch.prepare(m)))


def _imports(path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out |= {base} | {f"{base}.{a.name}" if node.module else base + a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_kernels_import_neither_models_nor_each_other_in_a_cycle():
    from pathlib import Path

    import llmzip.models
    import llmzip.paths

    folder = Path(registry.__file__).parent
    assert llmzip.models.cache_dir is llmzip.paths.cache_dir
    for f in folder.glob("*.py"):
        assert not any(i.startswith("llmzip.models") for i in _imports(f)), f.name
    assert not any("triton_qmm" in i for i in _imports(folder / "autotune.py"))
