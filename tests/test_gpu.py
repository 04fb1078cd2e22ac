"""Checks that need a CUDA device (skipped elsewhere; run them all with bench/gpu.sh)."""

import pytest
import torch
from conftest import tiny_llama

from llmzip.algorithms import rtn
from llmzip.config import QuantConfig, WeightScheme
from llmzip.sequential import calibrate_model
from llmzip.surgery import targets

pytestmark = pytest.mark.gpu


def test_rtn_on_cuda_matches_cpu():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)).bfloat16() * 0.02
    scheme = WeightScheme(4, 128, False)
    cpu, gpu = rtn(w, scheme), rtn(w.cuda(), scheme)
    assert torch.equal(cpu.scale, gpu.scale.cpu()) and torch.equal(cpu.zero, gpu.zero.cpu())
    assert (cpu.q == gpu.q.cpu()).float().mean().item() > 0.9999  # fp32 ties may round apart


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_calibration_on_cuda_matches_cpu(method):
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    test = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(method=method, weights=WeightScheme(4, 32))
    out = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama(dtype=torch.float32)
        calibrate_model(model, cfg, ids, targets(model, cfg)[0], device=device, progress=False)
        with torch.no_grad():
            out[device] = model(test).logits
    assert ((out["cuda"] - out["cpu"]).norm() / out["cpu"].norm()).item() < 1e-2


def test_moe_calibration_on_cuda_matches_cpu():
    from test_moe import _ids, _model

    from llmzip.moe import prepare_experts

    cfg = QuantConfig(method="awq+gptq", weights=WeightScheme(4, 32))
    out, counts = {}, {}
    for device in ("cpu", "cuda"):
        model = _model("qwen3_moe")
        prepare_experts(model)
        report = calibrate_model(model, cfg, _ids(), targets(model, cfg)[0], device=device, progress=False)
        counts[device] = report["blocks"][0]["expert_tokens"]
        with torch.no_grad():
            out[device] = model(_ids()).logits
    assert counts["cuda"] == counts["cpu"]
    assert ((out["cuda"] - out["cpu"]).norm() / out["cpu"].norm()).item() < 1e-2
