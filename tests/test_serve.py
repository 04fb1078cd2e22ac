"""`llmzip serve`: a real server on a random 127.0.0.1 port, driven by the official
`openai` client (and raw HTTP for malformed input and disconnects).

The model is SmolLM2-135M quantized W4 g64 (RTN), loaded in float32 so that greedy
decoding has no bf16 near-ties: the server's greedy tokens must equal
`model.generate`'s exactly, alone and with 16 requests of different lengths batched
together (tolerance: none; 16 of 16 identical).
"""

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import helpers
import pytest
import torch
from helpers import Server, free_port

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from llmzip import QuantConfig, WeightScheme, quantize  # noqa: E402
from llmzip.quant_linear import cached_dense_weights  # noqa: E402
from llmzip.serve.app import create_app  # noqa: E402
from llmzip.serve.server import build_engine  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "test-key-123"
NAME = "smollm2-w4"
TIMEOUT_ANSWER_MAX_S = 30  # a timed-out request is answered at its deadline (0.5 s), not after its 200 tokens
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three laws of motion are",
           "In 1969, the first", "Water boils at", "My favourite recipe for", "The quick brown fox",
           "Photosynthesis is the process", "To install the package, run", "The history of Rome",
           "Machine learning models", "A haiku about the sea:", "import numpy as np\n", "Dear Sir or Madam,",
           "The best way to learn"]


@pytest.fixture(scope="module")
def w4_dir(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "w4"
    quantize(str(smollm2_dir), QuantConfig(weights=WeightScheme(4, 64)), output_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def served(w4_dir):
    engine = build_engine(str(w4_dir), max_num_seqs=16, max_model_len=256, kv_dtype="auto", dtype=torch.float32,
                          device="cpu", max_queue=512)
    srv = Server(create_app(engine, NAME, api_key=KEY))
    yield srv, engine
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    srv, _ = served
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key=KEY, max_retries=0)


def reference(engine, prompt: str, n: int) -> list[int]:
    """model.generate's greedy tokens, each QuantLinear dequantized once for all steps
    (cached_dense_weights: the reference kernel's numerics, without its per-call dequantize)."""
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), cached_dense_weights(engine.model):
        out = engine.model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def raw(port, method, path, body=None, headers=None, key=KEY):
    return helpers.raw(port, method, path, body, headers, key)


def test_models_health_and_metrics(served, client):
    srv, engine = served
    assert [m.id for m in client.models.list().data] == [NAME]
    assert raw(srv.port, "GET", "/health", key=None) == (200, {"status": "ok"})
    status, text = raw(srv.port, "GET", "/metrics")
    assert status == 200 and "llmzip_running_seqs" in text and "llmzip_time_to_first_token_seconds_bucket" in text
    bpt = [line for line in text.splitlines() if line.startswith("llmzip_kv_cache_bytes_per_token")][0]
    assert float(bpt.split()[-1]) == 30 * 2 * 3 * 64 * 4  # fp32 K and V, 30 layers x 3 heads x 64
    steps = engine.stats["steps"]
    client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    _, text = raw(srv.port, "GET", "/metrics")
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("llmzip_engine")}
    assert value["llmzip_engine_steps_total"] == engine.stats["steps"] == steps + 3  # 1 pass: prompt + token 1; 2 decodes
    assert 0 < value["llmzip_engine_step_seconds_total"] == engine.stats["step_seconds"]


def test_greedy_equals_generate_alone_and_batched(served, client):
    _, engine = served
    lengths = [8 + 2 * i for i in range(16)]
    refs = [reference(engine, p, n) for p, n in zip(PROMPTS, lengths)]
    one = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=lengths[0], temperature=0)
    assert one.choices[0].text == engine.tokenizer.decode(refs[0], skip_special_tokens=True)
    assert one.usage.completion_tokens == len(refs[0])
    assert one.usage.prompt_tokens == len(engine.tokenizer(PROMPTS[0]).input_ids)

    def ask(i):
        r = client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0,
                                      logprobs=0)
        return r.choices[0]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    same = sum(c.text == engine.tokenizer.decode(r, skip_special_tokens=True) for c, r in zip(got, refs))
    assert same == 16
    assert [len(c.logprobs.tokens) for c in got] == [len(r) for r in refs]


def test_stream_concatenates_to_full_text_with_usage(client):
    full = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 30
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    msgs = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0)
    parts = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_text(client):
    text = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=40, temperature=0).choices[0].text
    stop = text[10:13]  # a stop string that first appears mid-answer
    cut = text[:text.index(stop)]
    r = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=40, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=40, temperature=0, stop=stop,
                                  stream=True)
    assert "".join(c.choices[0].text for c in s) == cut


def test_seeded_sampling_is_reproducible_and_n_choices(client):
    kw = dict(model=NAME, prompt=PROMPTS[3], max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 3 and a.choices[0].text == b.choices[0].text
    assert len({c.text for c in a.choices}) > 1  # choices use seeds 7, 8, 9


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "smollm2-w4", "prompt": ', 400, None),  # malformed JSON
    ({"model": NAME, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": NAME, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "word " * 400}, 400, "max_tokens"),  # longer than the 256-token context
    ({"model": NAME, "prompt": [999999]}, 400, "prompt"),
])
def test_bad_completion_requests(served, body, status, param):
    srv, _ = served
    code, err = raw(srv.port, "POST", "/v1/completions", body)
    assert code == status
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    if param:
        assert err["error"]["param"] == param
    assert raw(srv.port, "GET", "/health", key=None)[0] == 200


def test_bad_chat_and_auth(served, client):
    srv, _ = served
    assert raw(srv.port, "POST", "/v1/chat/completions", {"model": NAME, "messages": []})[0] == 400
    assert raw(srv.port, "POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "x"}]})[0] == 400
    code, err = raw(srv.port, "POST", "/v1/completions", {"model": NAME, "prompt": "hi"}, key="wrong")
    assert code == 401 and err["error"]["code"] == "invalid_api_key"
    assert raw(srv.port, "GET", "/v1/models", key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_disconnects_free_their_slots(served):
    srv, engine = served
    body = json.dumps({"model": NAME, "prompt": "Tell me a long story", "max_tokens": 200, "stream": True,
                       "temperature": 0})
    aborted = engine.stats["aborted"]
    for _ in range(100):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        r = conn.getresponse()
        assert r.status == 200 and r.read1(64).startswith(b"data:")  # the first chunk came
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    deadline = time.time() + 60
    while time.time() < deadline and (engine.load()["running"] or engine.load()["waiting"]):
        time.sleep(0.1)
    load = engine.load()
    assert load["running"] == 0 and load["waiting"] == 0 and load["kv_pages_used"] == 0
    assert engine.stats["aborted"] - aborted == 100  # every one cancelled, none ran to its 200 tokens
    _, text = raw(srv.port, "GET", "/metrics")
    assert "llmzip_kv_pages_used 0.0" in text



def test_request_timeout_answers_504_and_frees_the_slot(served):
    _, engine = served
    srv = Server(create_app(engine, NAME, api_key=KEY, request_timeout=0.5))
    try:
        aborted = engine.stats["aborted"]
        t0 = time.time()
        status, body = raw(srv.port, "POST", "/v1/completions",
                           {"model": NAME, "prompt": "Tell me a long story", "max_tokens": 200, "temperature": 0,
                            "ignore_eos": True})
        assert status == 504 and "timed out" in body["error"]["message"]
        assert time.time() - t0 < TIMEOUT_ANSWER_MAX_S
        deadline = time.time() + 60
        while time.time() < deadline and (engine.load()["running"] or engine.load()["kv_pages_used"]):
            time.sleep(0.05)
        load = engine.load()
        assert load["running"] == 0 and load["waiting"] == 0 and load["kv_pages_used"] == 0
        assert engine.stats["aborted"] - aborted == 1
    finally:
        srv.stop()



def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Send `sig` to one thread of another process (Linux x86_64 tgkill)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, sig) != 0:  # 234: SYS_tgkill on x86_64
        raise OSError(ctypes.get_errno(), "tgkill failed")


def _send(proc, how: str) -> None:
    import os
    import signal

    if how.startswith("sigterm"):
        proc.send_signal(signal.SIGTERM)
    else:  # SIGINT to a thread other than the main one
        others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        _tgkill(proc.pid, others[0], signal.SIGINT)


@pytest.mark.parametrize("how", ["sigint-other-thread-idle", "sigint-other-thread-streaming", "sigterm-streaming"])
def test_cli_server_finishes_running_requests_and_stops_on_signal(w4_dir, how):
    """`llmzip serve` as users run it: HTTP in a thread, the engine loop in the main thread
    (the one that loaded the model). A stream in flight when Ctrl-C or SIGTERM arrives
    finishes all its tokens; then (or at once when idle) the server exits with code 0. The
    kernel may hand a process's SIGINT to any of its threads; the "other-thread" cases send
    it to a thread other than the main one, where an untimed wait in the main thread would
    never see it."""
    import os
    import platform
    import subprocess
    import sys

    if how.startswith("sigint") and (sys.platform != "linux" or platform.machine() != "x86_64"):
        pytest.skip("tgkill's syscall number is x86_64 Linux's")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmzip", "serve", str(w4_dir), "--port", str(port),
                             "--served-model-name", "m", "--max-num-seqs", "2", "--max-model-len", "128",
                             # the stream must finish on its own, however loaded the machine is
                             "--shutdown-grace", "300"],
                            env={**os.environ, "LLMZIP_API_KEY": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, f"server did not come up (exit {proc.poll()})"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        max_tokens = 48
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": "m", "prompt": "The capital of France is", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        events = []
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 1 and how.endswith("streaming"):  # the first token is out
                _send(proc, how)
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
        assert finish == ["length"]
        assert events[-1]["usage"]["completion_tokens"] == max_tokens
        if how.endswith("idle"):
            time.sleep(0.5)  # the engine is waiting for work
            _send(proc, how)
        code = proc.wait(timeout=60)
        assert code == 0, proc.stdout.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
