"""A seeded fuzz test of `llmzip serve` on a tiny random model: a few hundred malformed or
edge-case requests (hostile values in every field, broken JSON and encodings, odd content
types, paths and methods, long prompts at the prefill-chunk boundaries), sent 4 at a time
while healthy greedy streams run beside them. Asserts no 5xx, no hang, every healthy
stream's text equal to its reference, and a server that still answers and holds no pages."""

import http.client
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from helpers import Server, raw, tiny_engine  # noqa: E402

from llmzip.serve.app import create_app  # noqa: E402

SEED = 25
N_CASES = 300
CLIENTS = 4
HEALTHY_STREAMS = 2
REQUEST_TIMEOUT_S = 30  # per request: a request that takes longer counts as a hang
BUDGET_S = 45  # the whole fuzz run (2 CPU cores)
DISTINCT_STATUSES_MIN = 5  # the cases reach many outcomes (200, 400, 401, 404, 405, 413, 415, ...)
KEY = "fuzz-key"
NAME = "tiny"
CONTEXT = 2048

HOSTILE = [None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30, 1.5, -0.0, 1e308,
           float("nan"), float("inf"), "", "5", "x" * 300, "\ud800", "a\udfffb", "\x00", "🌊" * 50, [], [1, 2],
           [[]], {}, {"a": 1}, [None], [-5], [10 ** 9]]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "n", "seed", "stop", "presence_penalty", "frequency_penalty", "stream", "stream_options", "logprobs",
          "top_logprobs", "ignore_eos", "logit_bias", "echo", "best_of", "suffix", "tools", "response_format",
          "user"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
                 "application/json; charset=utf-16", "application/json-patch+json", "text/plain", "",
                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "application/json;;;"]
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/v1/nope", "/docs",
         "/v1/completions/", "/../v1/completions", "/v1/chat/completions?x=%ff"]


def base(rng: random.Random, chat: bool) -> dict:
    body = {"model": NAME, "max_tokens": rng.randint(1, 4), "temperature": rng.choice([0, 0.7, 1.0])}
    if rng.random() < 0.3:
        body["stream"] = True
    if chat:
        body["messages"] = [{"role": rng.choice(["user", "system", "assistant"]), "content": "hi there"}]
    else:
        body["prompt"] = rng.choice(["hello", [5, 6, 7], ["a", "b"], [[1, 2], [3]]])
    return body


def case(rng: random.Random) -> tuple[str, str, bytes, dict]:
    """(method, path, body bytes, headers) of one fuzz case."""
    chat = rng.random() < 0.4
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    body = base(rng, chat)
    kind = rng.random()
    if kind < 0.45:  # hostile values in one to three fields
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FIELDS)] = rng.choice(HOSTILE)
    elif kind < 0.55:  # hostile message shapes
        body.pop("prompt", None)
        path = "/v1/chat/completions"
        body["messages"] = rng.choice([[{"role": "user", "content": rng.choice(HOSTILE)}],
                                       [{"role": rng.choice(HOSTILE), "content": "x"}],
                                       [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}],
                                       [{"role": "user", "content": [{"type": "image_url"}]}],
                                       [{"role": "user"}] * 40, "hi", [None]])
    elif kind < 0.62:  # long prompts at the prefill-chunk boundaries and past the context
        n = rng.choice([511, 512, 513, 1025, CONTEXT - 4, CONTEXT, CONTEXT + 1])
        body = {"model": NAME, "prompt": [rng.randrange(256) for _ in range(n)], "max_tokens": rng.choice([1, 4]),
                "stream": rng.random() < 0.5}
        path = "/v1/completions"
    elif kind < 0.72:  # content type, path and method
        headers["Content-Type"] = rng.choice(CONTENT_TYPES)
        path = rng.choice(PATHS)
        method = rng.choice(["POST", "GET", "PUT", "DELETE"])
        return method, path, json.dumps(body).encode(), headers
    elif kind < 0.78:  # no or a wrong key
        headers["Authorization"] = rng.choice(["", "Bearer", "Bearer wrong", f"Basic {KEY}", f"bearer {KEY}"])
    data = json.dumps(body).encode()  # json.dumps escapes lone surrogates: the server sees "\ud800"
    mangle = rng.random()
    if mangle < 0.06:
        data = data[:rng.randrange(len(data))]  # truncated JSON
    elif mangle < 0.10:
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))  # random bytes
    elif mangle < 0.13:
        data = data.replace(b'"hi there"', b'"\xed\xa0\xbd"').replace(b'"hello"', b'"\xff\xfe"')  # CESU, bad UTF-8
    elif mangle < 0.15:
        data = b"\xef\xbb\xbf" + data  # a UTF-8 BOM
    elif mangle < 0.17:
        data = b"[" * 5000 + b"]" * 5000  # deep nesting
    elif mangle < 0.19:
        data = json.dumps([body]).encode()  # an array, not an object
    return "POST", path, data, headers


def send(port: int, method: str, path: str, data: bytes, headers: dict) -> int:
    """The status; a stream is read to its end (an error event inside it counts as 500)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request(method, path, body=data if method != "GET" else None, headers=headers)
        r = conn.getresponse()
        out = r.read()
        if r.status == 200 and out.startswith(b"data:") and b'"error"' in out:
            return 500
        return r.status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served():
    engine = tiny_engine(max_num_seqs=8, max_model_len=CONTEXT, max_queue=64)
    srv = Server(create_app(engine, NAME, api_key=KEY, request_timeout=REQUEST_TIMEOUT_S))
    yield srv, engine
    srv.stop()


def stream_text(port: int, prompt: str, max_tokens: int) -> tuple[str, list]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    text, finish = "", []
    for line in conn.getresponse():
        line = line.decode().strip()
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                text += c["text"]
                finish += [c["finish_reason"]] if c["finish_reason"] else []
    conn.close()
    return text, finish


def test_fuzz_no_5xx_no_hang_healthy_streams_unaffected(served):
    srv, engine = served
    prompts = [f"healthy stream {i}" for i in range(HEALTHY_STREAMS)]
    want = [stream_text(srv.port, p, 24)[0] for p in prompts]  # references, alone
    rng = random.Random(SEED)
    cases = [case(rng) for _ in range(N_CASES)]
    stop, healthy, bad = threading.Event(), [], []

    def keep_streaming(i):
        while not stop.is_set():
            healthy.append((i, stream_text(srv.port, prompts[i], 24)))

    streams = [threading.Thread(target=keep_streaming, args=(i,)) for i in range(HEALTHY_STREAMS)]
    t0 = time.time()
    for t in streams:
        t.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = list(pool.map(lambda c: send(srv.port, *c), cases))
    finally:
        stop.set()
        for t in streams:
            t.join(REQUEST_TIMEOUT_S)
    elapsed = time.time() - t0
    bad = [(s, c[0], c[1], c[2][:120]) for s, c in zip(statuses, cases) if s >= 500]
    assert bad == []
    assert elapsed < BUDGET_S
    assert len(set(statuses)) >= DISTINCT_STATUSES_MIN
    assert healthy and all(text == want[i] and finish == ["length"] for i, (text, finish) in healthy)
    assert raw(srv.port, "GET", "/health") == (200, {"status": "ok"})
    deadline = time.time() + REQUEST_TIMEOUT_S
    while time.time() < deadline and (engine.load()["running"] or engine.load()["waiting"]):
        time.sleep(0.05)
    load = engine.load()
    assert load["running"] == 0 and load["waiting"] == 0 and load["kv_pages_used"] == 0
