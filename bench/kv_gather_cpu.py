"""CPU microbenchmark: gathering a decode step's KV pages (8 rows x 6 pages of 3 heads x 16
tokens x 64, bf16) by advanced indexing vs index_select on a 2-D view, and decode attention
(SDPA vs matmul/softmax). Usage: .venv/bin/python bench/kv_gather_cpu.py
"""
import torch, time
import torch.nn.functional as F
torch.set_num_threads(2)
def bench(f, n=500):
    for _ in range(20): f()
    t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n*1e6
rows, n, H, page, D, Hq = 8, 6, 3, 16, 64, 9
st = torch.randn(257, H, page, D).bfloat16()
table = torch.randint(1, 257, (rows, n))
flat = table.reshape(-1)
st64 = st.view(257, -1).view(torch.int64)
print("index bf16        %.0f" % bench(lambda: st[table]))
print("index_select 2d   %.0f" % bench(lambda: st.view(257, -1).index_select(0, flat)))
print("index int64 view  %.0f" % bench(lambda: st64[flat].view(torch.bfloat16)))
print("index_select i64  %.0f" % bench(lambda: st64.index_select(0, flat).view(torch.bfloat16)))
out = torch.empty(rows*n, H*page*D, dtype=torch.bfloat16)
print("cat of slices     %.0f" % bench(lambda: torch.cat([st[i] for i in flat.tolist()])))
q = torch.randn(rows, H, Hq//H, D).bfloat16()
k = torch.randn(rows, H, n*page, D).bfloat16()
mask = torch.zeros(rows, 1, 1, n*page).bfloat16()
print("sdpa bf16         %.0f" % bench(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask)))
def manual(q,k,v,mask):
    s = torch.matmul(q, k.transpose(-1,-2)) * 0.125 + mask
    return torch.matmul(torch.softmax(s.float(), -1).to(q.dtype), v)
print("manual bf16       %.0f" % bench(lambda: manual(q,k,k,mask)))
def manual32(q,k,v,mask):
    s = torch.baddbmm(mask.float().expand(rows, H*3, n*page).reshape(rows*H, 3, n*page) if False else None, q, k) if False else None
print("add tiny          %.0f" % bench(lambda: q + q))
