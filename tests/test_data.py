import json

import pytest
import torch

from llmzip.data import DataError, clean_wikitext, load_text, wiki_articles

LONG_LINES_MIN = 200  # lines over 80 characters in the lee corpus, each checked against the wiki text


def test_builtin_wiki_is_clean_and_stable():
    arts = wiki_articles()
    assert len(arts) == 105 and arts[0][0] == "Anarchism"
    text = load_text("wiki")
    assert len(text) == 2_872_234  # deterministic cleanup: same text on every machine
    for marker in ("{{", "<ref", "<!--", "'''"):
        assert marker not in text
    assert text.count("[[") <= 2  # two links nested inside image captions survive


def test_parsed_wiki_is_cached_on_disk_and_read_back(tmp_path, monkeypatch):
    """The parsed dump is written once to the llmzip cache, and read back equal without
    parsing; an unreadable cache file is parsed over and replaced."""
    from llmzip import data

    monkeypatch.setenv("LLMZIP_CACHE", str(tmp_path))
    data.wiki_articles.cache_clear()
    parsed = data.wiki_articles()
    files = list((tmp_path / "data").glob("wiki-articles-*.json"))
    assert len(files) == 1
    data.wiki_articles.cache_clear()
    monkeypatch.setattr(data, "_parse_wiki", lambda path: pytest.fail("parsed again despite the cache"))
    assert data.wiki_articles() == parsed
    files[0].write_text("{not json", encoding="utf-8")
    monkeypatch.setattr(data, "_parse_wiki", lambda path: parsed[:3])
    data.wiki_articles.cache_clear()
    assert data.wiki_articles() == parsed[:3]
    assert json.loads(files[0].read_text(encoding="utf-8"))[0] == list(parsed[0])
    data.wiki_articles.cache_clear()  # later tests parse or read the real cache again


def test_calibration_and_evaluation_corpora_are_disjoint():
    wiki, lee = load_text("wiki"), load_text("lee")
    lines = [ln.strip() for ln in lee.splitlines() if len(ln.strip()) > 80]
    assert len(lines) > LONG_LINES_MIN
    assert not any(ln[:80] in wiki for ln in lines)


def test_wikitext_cleanup_rules():
    raw = "'''Bold''' [[Target|shown]] and [[plain]]{{cite|x={{nested}}}}<ref>note</ref>.\n== Head =="
    assert clean_wikitext(raw) == "Bold shown and plain.\nHead"


def test_text_file_and_local_dataset_dir(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world")
    assert load_text(str(f)) == "hello world"
    d = tmp_path / "ds"
    d.mkdir()
    (d / "test.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "", "two"]))
    assert load_text(f"hub:{d}:test:text") == "one\n\ntwo"
    with pytest.raises(DataError, match="column 'body' not in"):
        load_text(f"hub:{d}:test:body")


def test_jsonl_and_parquet_records(tmp_path):
    rows = [{"text": "alpha", "body": "x"}, {"text": "beta", "body": "y"}]
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_text(str(f)) == "alpha\n\nbeta"
    assert load_text(f"{f}:body") == "x\n\ny"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    assert load_text(str(tmp_path / "r.parquet")) == "alpha\n\nbeta"
    with pytest.raises(DataError, match="column 'nope' not in"):
        load_text(f"{f}:nope")


@pytest.mark.parametrize("spec", ["nothing-here.txt", "hub:only-one-part"])
def test_bad_sources_are_clear_errors(spec):
    with pytest.raises(DataError):
        load_text(spec)


CHAT = [
    {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
    for i in range(40)
]


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_chat_calibration_renders_conversations_deterministically(tmp_path, smol_tok):
    from llmzip.calibration import CalibConfig, calibration_ids

    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in CHAT))
    cfg = CalibConfig(source=f"{f}:messages", samples=3, seq_len=24, chat=True)
    ids, digest = calibration_ids(smol_tok, cfg)
    again, digest2 = calibration_ids(smol_tok, cfg)
    _, other = calibration_ids(smol_tok, CalibConfig(source=f"{f}:messages", samples=3, seq_len=24, seed=1, chat=True))
    assert ids.shape == (3, 24) and torch.equal(ids, again) and digest == digest2 and other != digest
    # SmolLM2's template is ChatML: role markers are in the token stream.
    im_start = smol_tok.convert_tokens_to_ids("<|im_start|>")
    assert (ids == im_start).sum().item() >= 3
    assert "answer" in smol_tok.decode(ids.flatten())


def test_chat_calibration_from_plain_text_pairs_lines(smol_tok):
    from llmzip.calibration import CalibConfig, calibration_ids
    from llmzip.data import load_conversations

    convs = load_conversations("lee")
    assert [m["role"] for m in convs[0]] == ["user", "assistant"]
    ids, _ = calibration_ids(smol_tok, CalibConfig(samples=2, seq_len=64, chat=True))
    assert "assistant" in smol_tok.decode(ids.flatten())


def test_chat_calibration_errors(tmp_path, smol_tok):
    from llmzip.calibration import CalibConfig, calibration_ids
    from llmzip.config import ConfigError

    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in CHAT))
    with pytest.raises(DataError, match="--chat"):  # conversations read as plain text
        load_text(f"{f}:messages")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="no chat template"):
        calibration_ids(NoTemplate(), CalibConfig(source=f"{f}:messages", chat=True))
