"""Shared test helpers (plain functions; fixtures live in conftest.py): tiny random models,
the CLI in-process or as a subprocess, a tokenizer-free engine, and a tiny served model
(a byte-level tokenizer with a chat template, built offline), a uvicorn server on a free
127.0.0.1 port, and raw HTTP."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import torch


def tiny_llama(seed: int = 0, dtype=torch.bfloat16, **overrides):
    """A small random Llama (2 layers, hidden 128) for fast unit tests."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    kw = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**kw), dtype=dtype).eval()


def run_cli(*argv) -> int:
    """`llmzip.cli.main(argv)` in-process; the log handlers it adds are removed again."""
    import logging

    from llmzip.cli import main

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        return main([str(a) for a in argv])
    finally:
        for h in root.handlers[len(before):]:
            root.removeHandler(h)


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "llmzip", *args], capture_output=True, text=True, cwd=cwd, env=env)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ---------- the engine on a tiny model, without a tokenizer ----------


class Tok:
    """Enough of a tokenizer for the engine: ids -> text, no EOS."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def model_without_eos():
    m = tiny_llama(dtype=torch.float32)
    m.config.eos_token_id = m.generation_config.eos_token_id = None
    return m


def greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def collect(engine, prompt, params):
    events = []
    engine.submit(prompt, params, events.append)
    return events


# ---------- a tiny served model ----------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """256 byte tokens (GPT-2's byte-to-unicode alphabet, no merges) + 3 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                  additional_special_tokens=SPECIALS[1:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(tok, context: int = 2048, dtype=torch.float64):
    """A tiny random Llama whose vocabulary is exactly the tokenizer's, EOS included. float64 by
    default: a random model's top logits lie within 1e-3 of each other, and in fp32 a row's
    rounding can depend on what else is in its batch, which could flip a greedy token that
    tests compare with the same request run alone."""
    m = tiny_llama(dtype=dtype, vocab_size=len(tok), max_position_embeddings=context)
    m.config.eos_token_id = m.generation_config.eos_token_id = tok.eos_token_id
    return m


def tiny_checkpoint(path, context: int = 2048):
    """A model directory `llmzip serve` loads: the tiny model and tokenizer saved to `path`."""
    tok = tiny_tokenizer()
    tiny_model(tok, context, torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_engine(max_num_seqs: int = 8, max_model_len: int = 2048, max_queue: int = 64):
    from llmzip.serve.engine import Engine, EngineConfig

    tok = tiny_tokenizer()
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_queue=max_queue)
    return Engine(tiny_model(tok, max_model_len), tok, cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` in a thread on a free port."""

    def __init__(self, app, **config):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def raw(port, method, path, body=None, headers=None, key=None, timeout=60):
    """(status, parsed JSON or text). body: bytes/str as they are, anything else as JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    out = r.read()
    conn.close()
    try:
        return r.status, json.loads(out)
    except ValueError:
        return r.status, out.decode("utf-8", "replace")
