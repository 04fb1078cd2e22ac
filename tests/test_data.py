import json

import pytest

from llmzip.data import DataError, clean_wikitext, load_text, wiki_articles


def test_builtin_wiki_is_clean_and_stable():
    arts = wiki_articles()
    assert len(arts) == 105 and arts[0][0] == "Anarchism"
    text = load_text("wiki")
    assert len(text) == 2_872_234  # deterministic cleanup: same text on every machine
    for marker in ("{{", "<ref", "<!--", "'''"):
        assert marker not in text
    assert text.count("[[") <= 2  # two links nested inside image captions survive


def test_calibration_and_evaluation_corpora_are_disjoint():
    wiki, lee = load_text("wiki"), load_text("lee")
    lines = [ln.strip() for ln in lee.splitlines() if len(ln.strip()) > 80]
    assert len(lines) > 200
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
