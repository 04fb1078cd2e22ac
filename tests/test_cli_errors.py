"""Bad input on the command line: one line `llmzip: error: ...`, exit 2, no traceback.

Each case breaks one file of a tiny model (SmolLM2's tokenizer, hidden size 96) or gives
bad data / options, and runs `llmzip.cli.main` in this process (fast: no re-import).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmzip.api
import llmzip.commands
from llmzip.cli import EXIT_BAD_INPUT

from helpers import run_cli, tiny_llama

HIDDEN = 96  # 128 does not divide it, 32 does (like SmolLM2's 576, which 64 divides)
ERROR_LINES = 1  # what stderr may hold for bad input


@pytest.fixture(scope="module")
def dirs(smollm2_dir, tmp_path_factory):
    """{"base": a tiny Llama with SmolLM2's tokenizer, "quant": its RTN W4 g32 checkpoint}."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("cli-errors")
    model = tiny_llama(hidden_size=HIDDEN, intermediate_size=192, num_attention_heads=3, num_key_value_heads=1,
                       vocab_size=49152, tie_word_embeddings=True)
    model.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(root / "base")
    llmzip.quantize(str(root / "base"), llmzip.QuantConfig(weights=llmzip.WeightScheme(bits=4, group_size=32)),
                    output_dir=root / "quant", progress=False)
    return {"base": root / "base", "quant": root / "quant"}


def broken(src: Path, dst: Path, name: str, content: bytes) -> Path:
    """A copy of model dir `src` (symlinks) in which file `name` holds `content`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != name:
            (dst / f.name).symlink_to(f)
    (dst / name).write_bytes(content)
    return dst


def truncated(src: Path) -> bytes:
    data = (src / "model.safetensors").read_bytes()
    return data[: len(data) // 2]


SAFETENSORS_BREAKS = {
    "truncated": truncated,
    "random bytes": lambda src: os.urandom(4096),  # a header length far beyond the file
    "bad header": lambda src: (16).to_bytes(8, "little") + b'{"a": garbage!!}',
}
CONFIG_BREAKS = {"not json": b"{not json", "empty": b""}


def assert_one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    assert len(lines) == ERROR_LINES and lines[0].startswith("llmzip: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (bad data must be refused before)."""
    def bomb(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(llmzip.commands, "load_for_eval", bomb)
    monkeypatch.setattr(llmzip.api, "load_lazy_pretrained", bomb)
    monkeypatch.setattr(llmzip.api, "load_pretrained", bomb)


@pytest.mark.parametrize("how", SAFETENSORS_BREAKS)
@pytest.mark.parametrize("command", [["quantize"], ["quantize", "--load-whole-model"], ["eval", "ppl"]])
def test_corrupt_safetensors(dirs, tmp_path, capsys, command, how):
    bad = broken(dirs["base"], tmp_path / "m", "model.safetensors", SAFETENSORS_BREAKS[how](dirs["base"]))
    argv = [*command[:2], bad] if command[0] == "eval" else ["quantize", bad, "-o", tmp_path / "o", *command[1:]]
    if command[0] == "eval":
        argv += ["--ctx", 16, "--data", "wiki"]
    line = assert_one_line_error(capsys, run_cli(*argv), str(bad / "model.safetensors"), "truncated or corrupt")
    assert not (tmp_path / "o").exists(), line


@pytest.mark.parametrize("how", CONFIG_BREAKS)
@pytest.mark.parametrize("command", ["quantize", "eval-base", "eval-quant", "info"])
def test_bad_config_json(dirs, tmp_path, capsys, command, how):
    src = dirs["quant" if command in ("eval-quant", "info") else "base"]
    bad = broken(src, tmp_path / "m", "config.json", CONFIG_BREAKS[how])
    argv = {"quantize": ["quantize", bad, "-o", tmp_path / "o"], "info": ["info", bad]}.get(
        command, ["eval", "ppl", bad, "--ctx", 16])
    needle = "is empty" if how == "empty" else "is not valid JSON"
    assert_one_line_error(capsys, run_cli(*argv), str(bad / "config.json"), needle)


@pytest.mark.parametrize("command", [["quantize"], ["eval", "ppl"]])
def test_missing_shard(dirs, tmp_path, capsys, command):
    """A sharded model with one shard gone: named before anything is loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(dirs["base"]).save_pretrained(sharded, max_shard_size="4MB")
    AutoTokenizer.from_pretrained(dirs["base"]).save_pretrained(sharded)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    capsys.readouterr()  # the progress bars of the set-up above
    argv = ["quantize", sharded, "-o", tmp_path / "o"] if command[0] == "quantize" else ["eval", "ppl", sharded,
                                                                                         "--ctx", 16]
    assert_one_line_error(capsys, run_cli(*argv), str(shards[-1]), "is missing")


@pytest.mark.parametrize("command", [["eval", "ppl", "--ctx", "16"], ["info"], ["info", "--kernels"],
                                     ["serve", "--port", "0"]])
def test_truncated_quantized_checkpoint(dirs, tmp_path, capsys, command):
    bad = broken(dirs["quant"], tmp_path / "q", "model.safetensors", truncated(dirs["quant"]))
    argv = [*command[:2], bad, *command[2:]] if command[0] == "eval" else [command[0], bad, *command[1:]]
    assert_one_line_error(capsys, run_cli(*argv), str(bad / "model.safetensors"), "truncated or corrupt")


EVAL_DATA = {  # file content, extra options, words the error must hold
    "empty": (b"", [], "is empty or only whitespace"),
    "whitespace only": (b" \n\t\n  \n", [], "is empty or only whitespace"),
    "too short": (b"Just a few words.", ["--ctx", "64"], "fewer than one window of --ctx 64"),
    "invalid utf-8": (b"abc \xff\xfe def " * 100, [], "is not UTF-8 text (byte 0xff at offset 4)"),
    "ctx 0": (b"text " * 1000, ["--ctx", "0"], "--ctx 0 is too small"),
    "ctx 1": (b"text " * 1000, ["--ctx", "1"], "--ctx 1 is too small"),
    "stride 0": (b"text " * 1000, ["--ctx", "16", "--stride", "0"], "--stride 0 must be between 1 and --ctx"),
    "max-windows 0": (b"text " * 1000, ["--ctx", "16", "--max-windows", "0"], "--max-windows 0 must be at least 1"),
}


@pytest.mark.parametrize("case", EVAL_DATA)
@pytest.mark.parametrize("model", ["base", "quant"])
def test_eval_data_refused_before_model_load(dirs, tmp_path, capsys, no_model_load, case, model):
    content, extra, needle = EVAL_DATA[case]
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    assert_one_line_error(capsys, run_cli("eval", "ppl", dirs[model], "--data", data, *extra), needle)


@pytest.mark.parametrize("command", [["eval", "kld"], ["compare"]])
def test_kld_and_compare_data_refused_before_model_load(dirs, tmp_path, capsys, monkeypatch, no_model_load,
                                                         command):
    import llmzip.eval.compare

    monkeypatch.setattr(llmzip.eval.compare, "compare", lambda *a, **k: pytest.fail("compare ran on an empty text"))
    data = tmp_path / "data.txt"
    data.write_bytes(b"\n\n")
    argv = [*command, dirs["base"], dirs["quant"], "--data", data, "--report", tmp_path / "r"]
    if command[0] == "eval":
        argv = argv[:-2]
    assert_one_line_error(capsys, run_cli(*argv), "is empty or only whitespace")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_output_fails_before_any_work(dirs, capsys, no_model_load):
    # os.access(/proc, W_OK) is True for root, yet nothing can be created there.
    assert_one_line_error(capsys, run_cli("quantize", dirs["base"], "-o", "/proc/llmzip-out"),
                          "cannot write to /proc/llmzip-out", "choose another -o")


def test_pickled_weights_are_never_loaded(dirs, tmp_path, capsys):
    """A model whose weights are a pickle (pytorch_model.bin) is refused and never unpickled."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "pickled"
    bad.mkdir()
    for f in dirs["base"].iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).symlink_to(f)
    torch.save({"model.embed_tokens.weight": Payload()}, bad / "pytorch_model.bin")
    for argv in (["quantize", bad, "-o", tmp_path / "o"], ["quantize", bad, "-o", tmp_path / "o", "--load-whole-model"],
                 ["eval", "ppl", bad, "--ctx", 16], ["info", bad]):
        rc = run_cli(*argv)
        err = capsys.readouterr().err
        assert rc == EXIT_BAD_INPUT and "Traceback" not in err, err
        assert not marker.exists(), argv


def test_subprocess_exit_code_and_single_line(dirs, tmp_path):
    """The same contract seen from a shell: a separate process, exit status 2, one stderr line."""
    bad = broken(dirs["base"], tmp_path / "m", "model.safetensors", truncated(dirs["base"]))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "llmzip", "eval", "ppl", str(bad), "--ctx", "16"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == ERROR_LINES and str(bad / "model.safetensors") in lines[0], r.stderr


def test_library_errors_without_a_file_name_are_still_bad_input():
    """The CLI's one mapping: known library errors on user files are bad input, a plain bug is not."""
    from safetensors import SafetensorError

    from llmzip.errors import user_message

    assert "corrupt or truncated" in user_message(SafetensorError("Error while deserializing header"))
    assert "corrupt or truncated" in user_message(json.JSONDecodeError("Expecting value", "", 0))
    assert user_message(RuntimeError("a bug")) is None
    assert user_message(ValueError("a bug")) is None


KILL_IN_SAVE = """
import os, signal, sys
import llmzip
os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed just before the checkpoint is renamed into place
llmzip.quantize(sys.argv[1], llmzip.QuantConfig(weights=llmzip.WeightScheme(bits=4, group_size=32)),
                output_dir=sys.argv[2], progress=False)
"""


def test_next_run_removes_temp_dirs_of_killed_saves_only(dirs, tmp_path, capsys):
    out = tmp_path / "out"
    killed = subprocess.Popen([sys.executable, "-c", KILL_IN_SAVE, str(dirs["base"]), str(out)],
                              stderr=subprocess.PIPE)
    assert killed.wait() == -9, killed.stderr.read()
    left = tmp_path / f".out.tmp-{killed.pid}"
    assert (left / "model.safetensors").is_file() and not out.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        in_progress = tmp_path / f".out.tmp-{live.pid}"  # another process's save, still running
        in_progress.mkdir()
        assert run_cli("quantize", dirs["base"], "-o", out, "--group-size", 32) == 0, capsys.readouterr().err
        assert (out / "llmzip.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", in_progress.name])
    finally:
        live.kill()
        live.wait()

