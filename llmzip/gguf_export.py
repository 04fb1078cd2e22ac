"""`llmzip export --format gguf`: a quantized checkpoint as a GGUF file for llama.cpp.

Quantized Linears become Q4_0 / Q4_1 / Q8_0 blocks holding llmzip's own codes and scales
(llmzip.gguf_blocks: no requantization; other schemes are refused before anything is
written). Everything else is written as llama.cpp's convert_hf_to_gguf.py writes a Llama:
- tensor names from the `gguf` package's tensor map (token_embd, blk.N.attn_q, ...);
  q_proj and k_proj rows permuted per head from the HF rotary layout (two halves) to
  GGML's interleaved pairs: rows [head, 2, head_dim/2] -> [head, head_dim/2, 2];
- unquantized matrices in the checkpoint's dtype (F16/BF16/F32), norms in F32, no
  `output.weight` when the embeddings are tied;
- the `llama.*` hyperparameters, `general.file_type`, and the tokenizer: a byte-level BPE
  tokenizer.json as `gpt2` with its `tokenizer.ggml.pre` identified by llama.cpp's hash of
  a fixed text's tokens (PRE_TOKENIZERS), token types, merges, special ids and the chat
  template via gguf.SpecialVocab.
The file is written next to the target and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
from hashlib import sha256
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load
from .config import ConfigError
from .gguf_blocks import blocks_for, inexact_blocks, mapping_for
from .packing import unpack_int32
from .quant_linear import QuantLinear

log = logging.getLogger("llmzip")

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
INSTALL_HINT = "pip install gguf"
# llama.cpp's convert_hf_to_gguf.py: sha256 of str(tokenizer.encode(CHECK_TEXT)) -> tokenizer.ggml.pre
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 "
    "3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been "
    "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


def llama_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or its per-row scales / zeros) from HF's rotary layout to
    GGML's: [n_head, 2, d/2, ...] -> [n_head, d/2, 2, ...], as convert_hf_to_gguf does."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def export_gguf(src: str | Path, out_file: str | Path) -> dict:
    """Write the llmzip checkpoint `src` as GGUF to `out_file`; returns a report
    {"path", "type", "tensors", "inexact_blocks", "blocks"}."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"GGUF export needs the gguf package: {INSTALL_HINT}") from e
    src, out = Path(src).expanduser(), Path(out_file).expanduser().resolve()
    cfg = _check_source(src, out)
    model = load(src)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    first = next(iter(quant.values()))
    if any(m.scheme != first.scheme for m in quant.values()):
        raise ConfigError(f"{src} is mixed precision (--avg-bits): GGUF export needs one scheme for every layer")
    mapping = mapping_for(first.scheme, first.act_order)  # refuse before writing anything
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, "llama")
    _write_hparams(writer, gguf, cfg, mapping, src)
    _write_vocab(writer, gguf, src, cfg)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
    inexact = total = 0
    done = set()
    for name, m in quant.items():
        codes = unpack_int32(m.weight_packed, m.bits, m.in_features, dim=1)
        zero = None if m.scheme.symmetric else unpack_int32(m.weight_zero_point, m.bits, m.out_features, dim=0)
        scale = m.weight_scale
        n_head = heads.get(name.rsplit(".", 1)[-1])
        if n_head:
            codes, scale = llama_permute(codes, n_head), llama_permute(scale, n_head)
            zero = None if zero is None else llama_permute(zero, n_head)
        bad = inexact_blocks(codes, scale, zero)
        inexact, total = inexact + int(bad.sum()), total + bad.numel()
        data = blocks_for(mapping, codes, scale, zero)
        writer.add_tensor(_gguf_name(names, name + ".weight"), data.numpy(),
                          raw_dtype=gguf.GGMLQuantizationType[mapping.type_name])
        done.update(f"{name}.{k}" for k, _ in m.named_buffers())
    tied = cfg.get("tie_word_embeddings", False)
    for key, t in model.state_dict().items():
        if key in done or (tied and key == "lm_head.weight"):
            continue
        if key.endswith(".bias"):
            raise ConfigError(f"{key}: Linear biases are not part of llama.cpp's Llama graph; GGUF export supports "
                              f"{', '.join(ARCHS)} without biases")
        _add_dense(writer, gguf, _gguf_name(names, key), t)
    if mapping.type_name != "Q4_1" and inexact:
        raise ConfigError(f"{inexact} blocks have a scale that is not an fp16 number (outside fp16's range); "
                          "GGUF cannot hold them exactly")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    if inexact:
        log.warning("Q4_1: %d of %d blocks store their minimum -(z+8)*s rounded to fp16 (it needs one more "
                    "significant bit than fp16 has); all codes and scales are exact", inexact, total)
    return {"path": str(out), "type": mapping.type_name, "tensors": sum(len(t) for t in writer.tensors),
            "inexact_blocks": inexact, "blocks": total}


def _check_source(src: Path, out: Path) -> dict:
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{src} is not a checkpoint directory (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    if "quantization_config" not in cfg:
        raise CheckpointError(f"{src} is not quantized; quantize it first (llmzip quantize ... --format gguf)")
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHS:
        raise ConfigError(f"architecture {arch} is not supported by GGUF export (supported: {', '.join(ARCHS)})")
    if out.is_dir():
        raise CheckpointError(f"output {out} is a directory; give a file name such as model.gguf")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise CheckpointError(f"cannot write {out}: {out.parent} is not a writable directory")
    return cfg


def _gguf_name(names, key: str) -> str:
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ConfigError(f"tensor {key} has no GGUF name for a Llama model")
    return name


def _add_dense(writer, gguf, name: str, t: torch.Tensor) -> None:
    """1-D tensors (norms) as F32, matrices in their own dtype, as convert_hf_to_gguf writes them."""
    if t.dim() == 1 or t.dtype == torch.float32:
        writer.add_tensor(name, t.float().numpy())
    elif t.dtype == torch.float16:
        writer.add_tensor(name, t.numpy())
    else:  # bf16: its bytes, typed BF16
        writer.add_tensor(name, t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy(),
                          raw_dtype=gguf.GGMLQuantizationType.BF16)


def _write_hparams(writer, gguf, cfg: dict, mapping, src: Path) -> None:
    writer.add_type("model")
    writer.add_name(Path(str(cfg.get("_name_or_path") or src.name)).name or src.name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope is not None:
        writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim") is not None:
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    writer.add_file_type(gguf.LlamaFileType[mapping.file_type])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ConfigError(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not supported by "
                          "llmzip's GGUF export")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer, gguf, src: Path, cfg: dict) -> None:
    """A byte-level BPE tokenizer, as convert_hf_to_gguf's _set_vocab_gpt2 and LlamaModel.set_vocab."""
    from transformers import AutoTokenizer

    if not (src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file():
        raise ConfigError(f"{src}: GGUF export writes byte-level BPE tokenizers (tokenizer.json); "
                          "SentencePiece tokenizers (tokenizer.model) are not supported")
    tok = AutoTokenizer.from_pretrained(src)
    vocab_size = cfg["vocab_size"]
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if text in added:
            if not decoder[i].normalized:
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            special = decoder[i].special or (text.startswith("<|") and text.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    digest = sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise ConfigError(f"{src}: llama.cpp's pre-tokenizer for this tokenizer is not known to llmzip "
                          f"(hash {digest[:12]}...); export from a Llama-3, SmolLM or GPT-2 style tokenizer")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=True).add_to_gguf(writer)
    tc = src / "tokenizer_config.json"
    if tc.is_file() and "add_prefix_space" in (tcj := json.loads(tc.read_text())):
        writer.add_add_space_prefix(tcj["add_prefix_space"])
    if vocab_size == 49152:  # convert_hf_to_gguf: SmolLM / Granite-small vocabularies start without BOS
        writer.add_add_bos_token(False)
