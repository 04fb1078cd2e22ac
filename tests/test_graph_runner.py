"""serve/runner.py's GraphRunner: decode passes at static shapes (rows padded to a bucket,
block tables to the context's pages) give the dynamic pass's tokens; on CUDA the same
passes are captured as CUDA graphs and replayed."""

import pytest
import torch
from helpers import Tok, collect, model_without_eos

from llmzip.serve.engine import Engine, EngineConfig
from llmzip.serve.runner import GraphRunner, LeanRunner
from llmzip.serve.sampling import SamplingParams

MAX_TOKENS = 12
PROMPT_LENGTHS = (5, 19, 11, 3, 8)  # five requests: a decode pass of 5 rows pads to bucket 8
LOGITS_RTOL = 1e-9  # float64: padding rows and masked pages change nothing but summation order


def run(model, graphs: str, kv_dtype: str = "auto", device: str = "cpu"):
    eng = Engine(model, Tok(), EngineConfig(max_num_seqs=8, max_model_len=64, page=4, kv_dtype=kv_dtype,
                                            graphs=graphs))
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    runs = [collect(eng, prompts[0], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]
    eng.step()
    eng.step()  # the first request decodes alone (bucket 1) before the others arrive
    runs += [collect(eng, p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0)) for p in prompts[1:]]
    eng.run_until_done()
    return eng, [[t for e in r for t in e.tokens] for r in runs]


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_static_decode_passes_give_the_dynamic_passes_tokens(kv_dtype):
    model = model_without_eos().double()
    eng, static = run(model, "on", kv_dtype)
    assert isinstance(eng.runner, GraphRunner)
    assert {1, 8} <= set(eng.runner._passes)  # alone, then five rows padded to eight
    dyn_eng, dynamic = run(model, "off", kv_dtype)
    assert isinstance(dyn_eng.runner, LeanRunner)
    assert all(len(t) == MAX_TOKENS for t in static)
    assert static == dynamic
    assert len(eng.pool.free) == eng.pool.num_pages - 1  # every page back


def test_a_static_pass_computes_the_dynamic_logits():
    from llmzip.serve.scheduler import Chunk, Sequence

    model = model_without_eos().double()
    eng = Engine(model, Tok(), EngineConfig(max_num_seqs=4, max_model_len=64, page=4, graphs="on"))
    seqs = []
    for n in (6, 13, 2):
        s = Sequence(0, list(range(1, n + 1)), SamplingParams(), lambda e: None)
        s.pages = eng.pool.allocate(eng.pool.pages_for(n + 1))
        seqs.append(s)
    with torch.inference_mode():
        for s in seqs:  # prefill eagerly
            eng.runner.forward(torch.tensor([s.prompt]), torch.arange(len(s.prompt))[None], [s])
            s.pos, s.out = len(s.prompt), [7]
        chunk = Chunk(seqs, [[7]] * len(seqs), False)
        from llmzip.serve.scheduler import Batch

        static = eng.runner.execute(Batch([chunk])).clone()
        for s in seqs:  # the same tokens again, through the dynamic pass (they overwrite the same slots)
            s.pos = len(s.prompt)
        dynamic = eng.runner.base.execute(Batch([Chunk(seqs, [[7]] * len(seqs), False)]))
    assert static.shape == dynamic.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(static, dynamic, rtol=LOGITS_RTOL, atol=0)


def test_static_passes_refuse_what_they_cannot_run():
    model = model_without_eos()
    with pytest.raises(ValueError, match="non-KIVI"):
        Engine(model, Tok(), EngineConfig(max_num_seqs=2, max_model_len=64, kv_dtype="int4", graphs="on"))
    with pytest.raises(ValueError, match="lean forward"):
        Engine(model, Tok(), EngineConfig(max_num_seqs=2, max_model_len=64, forward="model", graphs="on"))
    with pytest.raises(ValueError, match="graphs 'sometimes'"):
        Engine(model, Tok(), EngineConfig(max_num_seqs=2, max_model_len=64, graphs="sometimes"))
    # auto: static passes only on CUDA
    assert isinstance(Engine(model, Tok(), EngineConfig(max_num_seqs=2, max_model_len=64)).runner, LeanRunner)


@pytest.mark.gpu
def test_cuda_graphs_replay_the_eager_passes_tokens():
    model = model_without_eos().to("cuda")
    eng = Engine(model, Tok(), EngineConfig(max_num_seqs=5, max_model_len=64, page=4, graphs="auto"))
    assert isinstance(eng.runner, GraphRunner) and eng.runner.capture
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    tokens = {}
    for graphs in ("auto", "off"):
        e = Engine(model, Tok(), EngineConfig(max_num_seqs=5, max_model_len=64, page=4, graphs=graphs))
        runs = [collect(e, p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0)) for p in prompts]
        e.run_until_done()
        tokens[graphs] = [[t for ev in r for t in ev.tokens] for r in runs]
        if graphs == "auto":
            assert all(p.graph is not None for p in e.runner._passes.values()) and e.runner._passes
    assert tokens["auto"] == tokens["off"]
