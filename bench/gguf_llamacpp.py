"""llmzip's Q4_0 GGUF exports in llama.cpp (llama-cpp-python), side by side with llama.cpp's
own Q4_0 of the same bf16 SmolLM2-135M, with and without an importance matrix.

Files (under bench/.work/gguf/):
- llmzip-{rtn,gptq,awq}.gguf: `llmzip quantize --method M --bits 4 --group-size 32` (sym),
  then llmzip's GGUF export (Q4_0 blocks of llmzip's codes; embeddings stay bf16).
- bf16.gguf: llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist) on the
  same bf16 checkpoint; llamacpp-q4_0.gguf / llamacpp-q4_0-imatrix.gguf: llama-quantize
  Q4_0 with --token-embedding-type bf16 (as llmzip keeps it), the second with an imatrix
  from llama-imatrix on the calibration samples llmzip uses (decoded to text, -c 512).
Perplexity: the first WINDOWS windows of CTX tokens of the built-in wiki text, tokenized by
the HF tokenizer, each scored on tokens 2..CTX from llama-cpp-python's logits
(bench/llamacpp_eval.py); llmzip's own perplexity of its checkpoints on the same windows
beside it. Greedy: NEW_TOKENS tokens after each prompt, llama.cpp vs llmzip (cpu kernels).

    bash bench/setup_peers.sh        # the llamacpp venv
    bench/build_llamacpp_tools.sh    # llama-quantize and llama-imatrix from the same sdist
    .venv/bin/python bench/gguf_llamacpp.py [--llmzip-only] [--fresh]

--llmzip-only runs the llmzip half (quantize, export, llmzip's perplexity and greedy) and
keeps it in bench/.work/gguf/llmzip_rows.json for the full run; --fresh redoes it.
Writes bench/results/gguf_llamacpp.{json,md}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmzip import QuantConfig, WeightScheme, load, quantize
from llmzip.calibration import CalibConfig, calibration_ids
from llmzip.data import load_text
from llmzip.eval.perplexity import perplexity, tokenize
from llmzip.gguf_export import export_gguf
from llmzip.models import demo_checkpoint, load_pretrained

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402

WORK = HERE / ".work" / "gguf"
VENV_PY = HERE / ".venvs" / "llamacpp" / "bin" / "python"
SDIST = next((HERE / ".venvs" / "llamacpp-src").glob("llama_cpp_python-*"), None)
TOOLS = HERE / ".venvs" / "llamacpp-tools" / "bin"
CONVERT_PY = HERE / ".venvs" / "ggufconvert" / "bin" / "python"  # llmzip's packages + mistral-common
CTX, WINDOWS, NEW_TOKENS, THREADS = 2048, 8, 32, 2
CALIB = CalibConfig(samples=32, seq_len=512)
METHODS = ("rtn", "gptq", "awq")
PROMPTS = ["The capital of France is", "In 1905, Albert Einstein published",
           "Water boils at a temperature of", "The largest planet in the solar system"]


def run(cmd: list[str]) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True)


def llamacpp_files(base_dir: Path, tok) -> dict[str, Path]:
    vendor = SDIST / "vendor" / "llama.cpp"
    bf16 = WORK / "bf16.gguf"
    if not bf16.exists():
        env_py = f"PYTHONPATH={vendor / 'gguf-py'}"  # the converter with the gguf-py of its own version
        run(["env", env_py, CONVERT_PY, vendor / "convert_hf_to_gguf.py", base_dir, "--outtype", "bf16",
             "--outfile", bf16])
    calib_txt = WORK / "calib.txt"
    ids, _ = calibration_ids(tok, CALIB)
    calib_txt.write_text("\n".join(tok.decode(row) for row in ids))
    imatrix = WORK / "imatrix.dat"
    if not imatrix.exists():
        run([TOOLS / "llama-imatrix", "-m", bf16, "-f", calib_txt, "-o", imatrix, "-c", CALIB.seq_len,
             "--chunks", CALIB.samples, "-t", THREADS])
    out = {"bf16": bf16}
    for label, extra in (("llama.cpp Q4_0", []), ("llama.cpp Q4_0 + imatrix", ["--imatrix", imatrix])):
        f = WORK / (label.replace(" ", "_").replace("+", "").replace(".", "") + ".gguf")
        run([TOOLS / "llama-quantize", *extra, "--token-embedding-type", "bf16", "--output-tensor-type", "bf16",
             bf16, f, "Q4_0", THREADS])
        out[label] = f
    return out


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    base_dir = demo_checkpoint("smollm2-135m")
    base, tok = load_pretrained(str(base_dir))
    ids = tokenize(tok, load_text("wiki"))
    windows = [ids[i * CTX:(i + 1) * CTX].tolist() for i in range(WINDOWS)]
    prompts = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    cached = WORK / "llmzip_rows.json"  # the llmzip half, kept when --llmzip-only ran it first
    if cached.exists() and "--fresh" not in sys.argv:
        rows = json.loads(cached.read_text())
    else:
        rows = llmzip_rows(base, base_dir, ids, prompts)
        cached.write_text(json.dumps(rows))
    if "--llmzip-only" in sys.argv:
        return
    ggufs = {f"llmzip {m} Q4_0": WORK / f"llmzip-{m}.gguf" for m in METHODS}
    ggufs.update(llamacpp_files(base_dir, tok))
    write_results(rows, ggufs, windows, prompts)


def llmzip_rows(base, base_dir, ids, prompts) -> dict:
    rows = {"bf16": {"llmzip_ppl": perplexity(base, ids, ctx=CTX, max_windows=WINDOWS, progress=False).ppl}}
    for method in METHODS:
        ckpt, gguf_file = WORK / f"llmzip-{method}", WORK / f"llmzip-{method}.gguf"
        t0 = time.perf_counter()
        quantize(str(base_dir), QuantConfig(method=method, weights=WeightScheme(4, 32, True)),
                 output_dir=ckpt, calib=CALIB if method != "rtn" else None, progress=False)
        quant_s = time.perf_counter() - t0
        export = export_gguf(ckpt, gguf_file)
        model = load(ckpt)
        res = perplexity(model, ids, ctx=CTX, max_windows=WINDOWS, progress=False)
        greedy = []
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)
            greedy.append(out[0, len(p):].tolist())
        label = f"llmzip {method} Q4_0"
        rows[label] = {"llmzip_ppl": res.ppl, "quant_s": round(quant_s, 1), "greedy_llmzip": greedy,
                       "inexact_blocks": export["inexact_blocks"]}
        print(label, rows[label]["llmzip_ppl"], flush=True)
        del model
    return rows


def write_results(rows, ggufs, windows, prompts) -> None:
    job = {"models": {k: str(v) for k, v in ggufs.items()}, "windows": windows, "prompts": prompts,
           "prompt_texts": PROMPTS, "new_tokens": NEW_TOKENS, "threads": THREADS}
    (WORK / "job.json").write_text(json.dumps(job))
    run([VENV_PY, HERE / "llamacpp_eval.py", "--job", WORK / "job.json", "--out", WORK / "llamacpp.json"])
    lc = json.loads((WORK / "llamacpp.json").read_text())
    for label, r in lc["models"].items():
        row = rows.setdefault(label, {})
        row.update(ppl_llamacpp=r["ppl"], llamacpp_s=r["seconds"], greedy_llamacpp=r["greedy"],
                   file_mib=round(Path(ggufs[label]).stat().st_size / 2**20, 1),
                   tokenizer_matches_hf=r["tokenized"] == prompts)
        if "greedy_llmzip" in row:
            row["greedy_equal_tokens"] = [_common_prefix(a, b) for a, b in zip(row["greedy_llmzip"], r["greedy"])]
    result = {"benchmark": "llmzip Q4_0 GGUF exports vs llama.cpp's own Q4_0 (SmolLM2-135M)",
              "ppl_protocol": f"wiki, HF tokenizer, first {WINDOWS} windows of {CTX}, tokens 2..{CTX} of each",
              "calibration": {**CALIB.to_dict(), "imatrix": f"llama-imatrix on the same samples decoded, -c "
                                                             f"{CALIB.seq_len} --chunks {CALIB.samples}"},
              "greedy": {"prompts": PROMPTS, "new_tokens": NEW_TOKENS},
              "llama_cpp_python": lc["llama_cpp_python"], "threads": THREADS, "machine": describe(),
              "command": ".venv/bin/python bench/gguf_llamacpp.py", "rows": rows}
    (HERE / "results" / "gguf_llamacpp.json").write_text(json.dumps(result, indent=2) + "\n")
    (HERE / "results" / "gguf_llamacpp.md").write_text(_markdown(result))
    print(_markdown(result))


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _markdown(r: dict) -> str:
    lines = [f"# {r['benchmark']}", "", f"Perplexity: {r['ppl_protocol']}. Calibration (GPTQ, AWQ, imatrix): "
             f"{r['calibration']['samples']} x {r['calibration']['seq_len']} tokens of 'lee' (seed "
             f"{r['calibration']['seed']}); imatrix: {r['calibration']['imatrix']}. llama-cpp-python "
             f"{r['llama_cpp_python']}, {r['threads']} threads. Machine: {r['machine']}. "
             f"Command: `{r['command']}`.", "",
             "| model | ppl (llama.cpp) | ppl (llmzip) | file MiB | greedy tokens equal (of "
             f"{r['greedy']['new_tokens']}, per prompt) | tokenizer = HF |",
             "|---|---:|---:|---:|---|---|"]
    for label, row in r["rows"].items():
        lc = f"{row['ppl_llamacpp']:.3f}" if "ppl_llamacpp" in row else "-"
        lz = row.get("llmzip_ppl")
        lines.append(f"| {label} | {lc} | {'-' if lz is None else f'{lz:.3f}'} | {row.get('file_mib', '-')} | "
                     f"{row.get('greedy_equal_tokens', '-')} | {row.get('tokenizer_matches_hf', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
