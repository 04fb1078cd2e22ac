"""`llmzip serve` against a hostile client, on a tiny random model (fast): long prompts,
out-of-range sampling values, malformed text and content types, chunked uploads past
the body limit, requests that can never fit, client disconnects and the API key."""

import http.client
import json
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from helpers import Server, raw, tiny_engine  # noqa: E402

from llmzip.serve.app import create_app  # noqa: E402

KEY = "k-123"
NAME = "tiny"
CONTEXT = 2048
CHUNK = 512  # prompt tokens prefilled per engine step
MAX_QUEUE = 64
BODY_LIMIT = 1 << 20  # create_app's default max_request_bytes
CHUNKED_BODY = 8 << 20  # an 8 MiB upload without Content-Length
REFUSE_WITHIN_S = 5.0  # a refused upload is answered long before 8 MiB could be tokenized


@pytest.fixture(scope="module")
def served():
    engine = tiny_engine(max_num_seqs=8, max_model_len=CONTEXT, max_queue=MAX_QUEUE)
    srv = Server(create_app(engine, NAME, api_key=KEY))
    yield srv, engine
    srv.stop()


def post(srv, body, path="/v1/completions", **kw):
    return raw(srv.port, "POST", path, body, key=KEY, **kw)


def settle(engine, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline and (engine.load()["running"] or engine.load()["waiting"]):
        time.sleep(0.05)
    return engine.load()


@pytest.mark.parametrize("n", [511, 512, 513, 1025, CONTEXT - 4])
def test_long_prompts_are_answered(served, n):
    srv, _ = served
    code, body = post(srv, {"model": NAME, "prompt": [28] * n, "max_tokens": 4, "ignore_eos": True})
    assert code == 200, body
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 4, "total_tokens": n + 4}


def test_a_long_chat_prompt_is_answered(served):
    srv, _ = served
    msgs = [{"role": "user", "content": "a long question " * 50}]  # 800 bytes: as many tokens here
    code, body = post(srv, {"model": NAME, "messages": msgs, "max_tokens": 3, "ignore_eos": True},
                      "/v1/chat/completions")
    assert code == 200, body
    assert body["usage"]["prompt_tokens"] > CHUNK and body["usage"]["completion_tokens"] == 3


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CMPL = {"model": NAME, "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("body, param", [
    ({**CMPL, "top_k": 2 ** 63}, "top_k"),
    ({**CMPL, "top_k": 2 ** 64}, "top_k"),
    ({**CMPL, "top_k": 10 ** 30}, "top_k"),
    ({**CMPL, "top_k": 260}, "top_k"),  # the vocabulary has 259 tokens
    ({**CMPL, "seed": 2 ** 64}, "seed"),
    ({**CMPL, "seed": -(2 ** 63) - 1}, "seed"),
    ({**CMPL, "n": 17}, "n"),
    ({**CMPL, "max_tokens": 0}, "max_tokens"),
    ({**CMPL, "logprobs": 21}, "logprobs"),
    ({**CMPL, "presence_penalty": 2.5}, "presence_penalty"),
    ({**CMPL, "frequency_penalty": -9}, "frequency_penalty"),
    ({**CMPL, "temperature": 1e309}, "temperature"),
    ({**CHAT, "top_k": "5x"}, "top_k"),
    ({**CMPL, "prompt": "\ud800"}, "prompt"),
    ({**CMPL, "prompt": "a\udfffb"}, "prompt"),
    ({**CMPL, "prompt": ["ok", "\ud800"]}, "prompt.1"),
    ({**CHAT, "messages": [{"role": "user", "content": "\ud83d"}]}, "messages.0.content"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]},
     "messages.0.content.0.text"),
])
def test_out_of_range_values_and_lone_surrogates_get_400(served, body, param):
    srv, _ = served
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    code, err = post(srv, body, path)
    assert code == 400, err
    assert err["error"]["param"] == param and err["error"]["message"]


@pytest.mark.parametrize("field, value", [("top_k", "5"), ("max_tokens", "2"), ("stream", "yes"), ("n", 1.0),
                                          ("temperature", "0.5"), ("ignore_eos", 1)])
def test_values_of_the_wrong_json_type_get_400_as_in_openais_api(served, field, value):
    srv, _ = served
    code, err = post(srv, {**CHAT, field: value}, "/v1/chat/completions")
    assert code == 400 and err["error"]["param"] == field
    code, _ = post(srv, {**CHAT, "temperature": 1, "top_p": 1}, "/v1/chat/completions")  # ints stand for floats
    assert code == 200


def test_one_requests_sampling_failure_fails_only_that_request(served, monkeypatch):
    """A sampling failure injected for one request (top_k 7 marks it) while three greedy
    streams run: that request gets a 500, each stream its full reference text."""
    from concurrent.futures import ThreadPoolExecutor

    from llmzip.serve import sampling

    srv, _ = served
    body = {"model": NAME, "prompt": "a healthy stream", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    want = post(srv, body)[1]["choices"][0]["text"]
    real = sampling.sample

    def poisoned(logits, params, history, generators):
        if any(p.top_k == 7 for p in params):
            raise ValueError("injected")
        return real(logits, params, history, generators)

    monkeypatch.setattr(sampling, "sample", poisoned)
    monkeypatch.setattr("llmzip.serve.engine.sample", poisoned, raising=False)  # where it was imported before
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream_text, srv.port, body) for _ in range(3)]
        time.sleep(0.05)
        code, err = post(srv, {**body, "temperature": 1.0, "top_k": 7})
        texts = [f.result() for f in streams]
    assert code == 500 and err["error"]["type"] == "server_error"
    assert texts == [(want, ["length"])] * 3


def stream_text(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    text, finish = "", []
    for line in conn.getresponse():
        line = line.decode().strip()
        if line.startswith("data: {"):
            for c in json.loads(line[6:]).get("choices", []):
                text += c["text"]
                finish += [c["finish_reason"]] if c["finish_reason"] else []
    conn.close()
    return text, finish


@pytest.mark.parametrize("data, content_type, status", [
    (json.dumps(CMPL).replace('"hi"', '"\\ud800"').encode(), "application/json", 400),  # escaped surrogate
    (b'{"model": "tiny", "prompt": "a\xed\xa0\x80b"}', "application/json", 400),  # raw CESU-8 surrogate bytes
    (b'{"model": "tiny", "prompt": "caf\xe9"}', "application/json; charset=latin-1", 415),
    (json.dumps(CMPL).encode("utf-16"), "application/json; charset=utf-16", 415),
    (json.dumps(CMPL).encode(), "application/json-patch+json", 415),
    (json.dumps(CMPL).encode(), "text/plain", 415),
    (json.dumps(CMPL).encode(), "application/json; charset=UTF-8", 200),
])
def test_malformed_text_and_content_types(served, data, content_type, status):
    srv, _ = served
    code, body = post(srv, data, headers={"Content-Type": content_type})
    assert code == status, body
    assert raw(srv.port, "GET", "/health")[0] == 200


def test_chunked_upload_past_the_limit_is_refused_without_reading_it(served):
    srv, engine = served
    before = engine.stats["prompt_tokens"]
    piece = b"a" * 65536
    head = b'{"model": "tiny", "max_tokens": 1, "prompt": "'
    chunks = [head] + [piece] * (CHUNKED_BODY // len(piece)) + [b'"}']
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    t0 = time.time()
    conn.putrequest("POST", "/v1/completions")
    for k, v in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                 ("Transfer-Encoding", "chunked")):
        conn.putheader(k, v)
    conn.endheaders()
    try:
        for c in chunks:
            conn.send(b"%x\r\n%s\r\n" % (len(c), c))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the whole body went out
    r = conn.getresponse()
    status, body = r.status, json.loads(r.read())
    conn.close()
    assert status == 413 and str(BODY_LIMIT) in body["error"]["message"]
    assert time.time() - t0 < REFUSE_WITHIN_S
    assert engine.stats["prompt_tokens"] == before  # nothing was tokenized or run
    assert raw(srv.port, "GET", "/health")[0] == 200


def test_a_request_that_can_never_fit_gets_400_not_503(served):
    srv, _ = served
    code, err = post(srv, {"model": NAME, "prompt": ["a"] * 5, "n": 16, "max_tokens": 1})  # 80 > MAX_QUEUE
    assert code == 400 and "80 sequences" in err["error"]["message"] and "--max-queue" in err["error"]["message"]


def test_non_streamed_requests_whose_client_left_are_cancelled(served):
    """10 non-streamed requests for 1000 tokens each; their clients hang up after 0.3 s.
    Every one is aborted (none runs to its end) and every KV page comes back."""
    srv, engine = served
    aborted, finished = engine.stats["aborted"], engine.stats["finished"]
    conns = []
    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "tell", "max_tokens": 1000,
                                                            "ignore_eos": True}),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        conns.append(conn)
    time.sleep(0.3)
    for conn in conns:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    load = settle(engine)
    assert load["running"] == 0 and load["waiting"] == 0 and load["kv_pages_used"] == 0
    assert engine.stats["aborted"] - aborted == 10 and engine.stats["finished"] == finished


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_every_path_but_health_needs_the_key(served, path):
    srv, _ = served
    code, err = raw(srv.port, "GET", path)
    assert code == 401 and err["error"]["code"] == "invalid_api_key"
    assert raw(srv.port, "GET", path, key=KEY)[0] == 200
    assert raw(srv.port, "GET", "/health") == (200, {"status": "ok"})


def test_serve_on_a_port_in_use_is_a_one_line_error_with_exit_2(tmp_path, capsys):
    from helpers import tiny_checkpoint

    from llmzip.cli import main

    ckpt = tiny_checkpoint(tmp_path / "tiny")
    capsys.readouterr()  # saving it may print progress
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code = main(["serve", str(ckpt), "--port", str(s.getsockname()[1])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "in use" in err[0] and "--port" in err[0]


def test_shutdown_ends_every_open_stream_with_abort_and_done(tmp_path, monkeypatch):
    """`llmzip serve` as users run it (the engine loop in this, the main thread): SIGTERM while
    two streams of 2000 tokens run. When the grace period is over (`--shutdown-grace 1`),
    both streams get a final chunk with finish_reason "abort" and [DONE], and serve exits 0."""
    import os
    import signal
    import threading

    from helpers import free_port, tiny_checkpoint

    from llmzip.cli import main
    from llmzip.serve import server

    monkeypatch.setattr(server, "CLOSE_STREAMS_S", 5.0, raising=False)
    monkeypatch.delenv("LLMZIP_API_KEY", raising=False)
    ckpt, port = tiny_checkpoint(tmp_path / "tiny"), free_port()
    streams, errors = [[], []], []

    def client():
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if raw(port, "GET", "/health", timeout=5)[0] == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            threads = [threading.Thread(target=stream, args=(lines, i == 0)) for i, lines in enumerate(streams)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        except Exception as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)
        finally:
            if not all(streams):
                os.kill(os.getpid(), signal.SIGTERM)  # never leave serve running

    def stream(lines, signals):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": "tiny", "prompt": "go", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        for line in conn.getresponse():
            if line.strip():
                lines.append(line.decode().strip())
                if signals and len(lines) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    code = main(["serve", str(ckpt), "--port", str(port), "--served-model-name", "tiny", "--max-num-seqs", "2",
                 "--shutdown-grace", "1"])
    t.join(30)
    assert not errors and code == 0
    for lines in streams:
        assert lines[-1] == "data: [DONE]"
        finish = [c["finish_reason"] for x in lines[:-1] for c in json.loads(x[6:])["choices"] if c["finish_reason"]]
        assert finish == ["abort"]


def test_serve_help_names_the_api_key_variable(capsys):
    from llmzip.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "$LLMZIP_API_KEY" in capsys.readouterr().out.replace("\n", " ")
