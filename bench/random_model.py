"""A random-weight checkpoint with a real model's shapes, for speed measurements.

Quality is meaningless (weights are random), so only the shapes matter: Llama-3-8B's
hidden 4096, intermediate 14336, 32 heads (8 KV heads) and 32 layers, with the vocabulary
of the tokenizer it ships with (SmolLM2's, 49152 entries, instead of Llama-3's 128256, so
that every generated id decodes). The weights are initialised on the GPU when there is one.

    python bench/random_model.py --export-tokenizer bench/.work/tokenizer   # here, once (~3 MB)
    python bench/random_model.py -o bench/.work/rand8b --tokenizer bench/.work/tokenizer [--layers N]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
}


def export_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    from llmzip.models import demo_checkpoint

    AutoTokenizer.from_pretrained(demo_checkpoint("smollm2-135m")).save_pretrained(out)
    print(f"tokenizer files in {out}")


def make(out: Path, tokenizer: Path, shape: str, layers: int | None, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False, **dims)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{shape}-shaped random model, {cfg.num_hidden_layers} layers, {n / 1e9:.2f}B parameters, {dtype}: {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", help="checkpoint directory to write")
    ap.add_argument("--tokenizer", help="directory with the tokenizer files (see --export-tokenizer)")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real model")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--export-tokenizer", metavar="DIR", help="write the demo model's tokenizer files to DIR and exit")
    a = ap.parse_args()
    if a.export_tokenizer:
        return export_tokenizer(Path(a.export_tokenizer))
    if not (a.output and a.tokenizer):
        ap.error("-o and --tokenizer are required (or --export-tokenizer DIR)")
    make(Path(a.output), Path(a.tokenizer), a.shape, a.layers, a.dtype)


if __name__ == "__main__":
    main()
