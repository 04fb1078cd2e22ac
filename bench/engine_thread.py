"""The serving engine stepped from a thread other than the main one, on CPU: 8 streams x 2
requests x 32 tokens of SmolLM2 W4, engine and model built in that thread. `all-in-thread`: no
OpenMP use in the main thread (192 tok/s here); `touch-main`: one matmul in the main thread
first (128 tok/s). Usage: LLMZIP_CACHE=$PWD/.cache/llmzip .venv/bin/python bench/engine_thread.py W4DIR all-in-thread|touch-main
"""
import sys, time, torch, threading
sys.path.insert(0, "bench")
def work():
    from llmzip.serve.server import build_engine
    from llmzip.serve.sampling import SamplingParams
    from serve import PROMPTS
    eng = build_engine(sys.argv[1], max_num_seqs=8, max_model_len=512, kv_dtype="auto")
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    def run(n, rounds=2):
        for r in range(rounds):
            for i in range(8):
                eng.submit(prompts[(i + r) % len(prompts)], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), lambda e: None)
        eng.run_until_done()
    run(4, 1)
    t = time.perf_counter(); run(32); dt = time.perf_counter() - t
    print(sys.argv[2], f"{16*32/dt:.1f} tok/s aggregate")
if sys.argv[2] == "touch-main":
    torch.randn(256, 256) @ torch.randn(256, 256)  # an OpenMP region in the main thread first
th = threading.Thread(target=work); th.start(); th.join()
