"""GPU diagnostic (one device call): bf16 RTN scale arithmetic on CPU vs CUDA, step by step
(which intermediate differs, and in what fraction), and the host cost of one W4 QuantLinear
call at M = 1 (4096 -> 6144) vs fp16 F.linear, its device time in a CUDA graph, and a
cProfile of the call. Usage (after bench/gpu.sh's install): python3 bench/gpu_diag.py
"""
import cProfile, pstats, time, io, torch
from llmzip.algorithms import rtn
from llmzip.config import WeightScheme
from llmzip import primitives as P
# 1. RTN scales CPU vs CUDA
w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)).bfloat16() * 0.02
for dev in ("cpu", "cuda"):
    g = w.to(dev).float().reshape(512, 8, 128)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    s = (hi - lo) / 15
    st = s.to(torch.bfloat16)
    small = st.float() < s
    up = torch.nextafter(st, torch.full_like(st, float("inf")))
    globals()[dev] = dict(lo=lo.cpu(), hi=hi.cpu(), s=s.cpu(), st=st.cpu(), small=small.cpu(), up=up.cpu(),
                          final=P._store(s, torch.bfloat16).cpu())
for k in cpu:
    a, b = cpu[k], cuda[k]
    print("rtn diag", k, "differ frac", (a != b).float().mean().item())
x = torch.tensor([1.0, 0.0123, 3.5], dtype=torch.bfloat16)
print("nextafter bf16 cpu", torch.nextafter(x, torch.full_like(x, float("inf"))).tolist(),
      "cuda", torch.nextafter(x.cuda(), torch.full_like(x.cuda(), float("inf"))).tolist())
d = (cpu["s"] != cuda["s"])
print("fp32 s ulps:", ((cpu["s"].view(torch.int32) - cuda["s"].view(torch.int32)).abs()).max().item(), d.sum().item())
# 2. qmm host overhead at M = 1 (QuantLinear forward, as the engine calls it)
from llmzip.quant_linear import QuantLinear
import torch.nn as nn
K, N = 4096, 6144
lin = nn.Linear(K, N, bias=False).half()
r = rtn(lin.weight.detach(), WeightScheme(4, 128, True))
ql = QuantLinear.from_quantized(lin, r.q, r.scale, r.zero, WeightScheme(4, 128, True)).cuda()
linc = lin.cuda()
x = torch.randn(1, 1, K, device="cuda", dtype=torch.float16)
for m in (ql, linc):
    for _ in range(20):
        m(x)
torch.cuda.synchronize()
print("kernel:", ql.kernel_name)
for name, m in (("w4 qmm", ql), ("fp16 linear", linc)):
    for rep in range(2):
        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            m(x)
        host = (time.perf_counter() - t) / n
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n
        print(f"{name}: host {host*1e6:.1f} us/call, wall {wall*1e6:.1f} us/call")
ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    for _ in range(50):
        ql(x)
g.replay(); torch.cuda.synchronize()
ev[0].record(); g.replay(); ev[1].record(); torch.cuda.synchronize()
print(f"w4 qmm in a graph: {ev[0].elapsed_time(ev[1]) / 50 * 1000:.1f} us/call (device)")
pr = cProfile.Profile()
pr.enable()
for _ in range(500):
    ql(x)
pr.disable()
torch.cuda.synchronize()
sio = io.StringIO()
pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(18)
print(sio.getvalue()[-4500:])
