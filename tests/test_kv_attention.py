"""Triton paged decode attention over the INT8 KV pool (CPU: TRITON_INTERPRET=1) against
its plain-torch reference and against attention over the pool's own dequantized read."""

import math

import pytest
import torch

from llmzip.serve.kv_pool import KVPool

REL_ERR_MAX = 1e-5  # decode attention vs its reference and vs the pool's dequantized read (fp32)

triton_kv = pytest.importorskip("llmzip.kernels.triton_kv_attention")
if triton_kv.triton is None:
    pytest.skip("triton is not installed", allow_module_level=True)


def filled_pool(lengths, hkv=2, d=24, page=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = KVPool(1, 64, hkv, d, torch.float32, "cpu", page=page, kv_dtype="int8")
    tables = []
    for n in lengths:
        pages = pool.allocate(pool.pages_for(n))
        pos = torch.arange(n)
        ids = torch.tensor(pages)[pos // page]
        pool.write(0, ids, pos % page, torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g) * 2)
        tables.append(pages)
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return pool, table


@pytest.mark.parametrize("lengths, hq, hkv, d", [([5, 1, 13], 4, 2, 24), ([16, 9], 2, 2, 32), ([3], 6, 1, 16)])
def test_decode_attention_matches_reference_and_pool_read(lengths, hq, hkv, d):
    pool, table = filled_pool(lengths, hkv=hkv, d=d)
    q = torch.randn(len(lengths), hq, d, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor(lengths)
    args = (q, pool.k[0], pool.kp[0], pool.v[0], pool.vp[0], table, lens)
    ref = triton_kv.decode_attention_reference(*args)
    out = triton_kv.decode_attention(*args)
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < REL_ERR_MAX
    # Independent check: the pool's own dequantized read + plain softmax attention.
    K, V = pool.read(0, table)  # [B, Hkv, pages*page, D]
    for b, n in enumerate(lengths):
        k = K[b, :, :n].repeat_interleave(hq // hkv, 0)
        v = V[b, :, :n].repeat_interleave(hq // hkv, 0)
        att = torch.softmax((q[b][:, None, :] * k).sum(-1) / math.sqrt(d), -1)
        want = (att[:, :, None] * v).sum(1)
        assert ((out[b] - want).norm() / want.norm()).item() < REL_ERR_MAX
