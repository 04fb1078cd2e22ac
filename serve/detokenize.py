"""Incremental detokenization: the text of a sequence's output, one token at a time."""

from __future__ import annotations


def incremental_text(tokenizer, seq, ids: list[int] | None = None) -> str:
    """The text of `ids` (default: seq.out, or a prefix of it), decoded incrementally: a
    call decodes only the tokens from the previous character boundary on, next to the
    tokens before it (the window's first token decodes alike in both, so a leading space
    a tokenizer strips from a decode's first token is kept). Decoding the whole output
    for every token would cost each step time that grows with the outputs' lengths.
    `seq` keeps the state between calls: text (out[:read_offset] decoded), prefix_offset
    and read_offset."""
    ids = seq.out if ids is None else ids
    decode = tokenizer.decode
    prefix = decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True) \
        if seq.read_offset > seq.prefix_offset else ""
    window = decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    if not window.startswith(prefix):  # a tokenizer whose decode is not local: start over
        seq.text, seq.prefix_offset, seq.read_offset = "", 0, 0
        prefix, window = "", decode(ids, skip_special_tokens=True)
    new = window[len(prefix):]
    if new.endswith("\ufffd"):  # an incomplete character: decode these tokens again next time
        return seq.text + new
    seq.text += new
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    return seq.text
