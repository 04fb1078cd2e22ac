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


class Detokenizer:
    """Turns each new token of a sequence into the text it settles, and says when the
    sequence is done: at an end-of-sequence id (unless ignore_eos), at a stop string (the
    text ends before it), at max_tokens or at the end of the context. Text that could still
    turn into a stop string, or an incomplete character, is held back until it settles."""

    def __init__(self, tokenizer, eos: set[int], max_model_len: int):
        self.tokenizer, self.eos, self.max_model_len = tokenizer, eos, max_model_len

    def text(self, seq, ids: list[int] | None = None) -> str:
        return incremental_text(self.tokenizer, seq, ids)

    def advance(self, seq, tok: int) -> tuple[str, str | None]:
        """(text to emit now, finish reason or None) after `tok` was appended to seq.out.
        A finished sequence's text is all the rest of it."""
        p = seq.params
        if tok in self.eos and not p.ignore_eos:
            return self.text(seq, seq.out[:-1])[seq.sent:], "stop"
        text = self.text(seq)
        hits = [i for i in (text.find(s, max(0, seq.sent - len(s))) for s in p.stop) if i >= 0]
        if hits:
            return text[:min(hits)][seq.sent:], "stop"
        if len(seq.out) >= p.max_tokens or seq.pos + 1 >= self.max_model_len:
            return text[seq.sent:], "length"
        hold = max((len(s) for s in p.stop), default=1) - 1
        safe = len(text.rstrip("\ufffd")) - hold  # an incomplete character, or a stop string's start
        delta = text[seq.sent:safe] if safe > seq.sent else ""
        seq.sent += len(delta)
        return delta, None
