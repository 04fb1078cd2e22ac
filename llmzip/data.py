"""Text sources for evaluation (and, later, calibration), all offline-capable.

Built-in corpora ship inside the `gensim==4.4.0` PyPI package (install it with
`pip install --no-deps gensim==4.4.0`; only its data files are read, it is never
imported):
- "wiki": 106 English Wikipedia articles (CC BY-SA), markup stripped deterministically.
  The evaluation corpus.
- "lee": the Lee news background corpus. Reserved for calibration, so calibration
  and evaluation text never overlap.
Other sources: a text file; a .jsonl or .parquet file (column "text", or
`file.jsonl:COLUMN`); or a `datasets` id (or local dataset directory) written
`hub:ID[:CONFIG]:SPLIT:COLUMN` (e.g. `hub:wikitext:wikitext-2-raw-v1:test:text`).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

from .errors import UserError
from .files import read_text
from .models import package_dir
from .paths import cache_dir

log = logging.getLogger("llmzip")

GENSIM = ("gensim", "gensim==4.4.0")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
BUILTIN = ("wiki", "lee")


class DataError(UserError):
    """A text source cannot be read; the message says why and what to do."""


def _gensim_file(name: str) -> Path:
    path = package_dir(*GENSIM) / "test" / "test_data" / name
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall with `pip install --no-deps {GENSIM[1]}`")
    return path


_WIKI_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>", re.S), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://\S+\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced open_..close spans (templates {{ }}, tables {| |})."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    for pattern, repl in _WIKI_RULES:
        text = pattern.sub(repl, text)
    return html.unescape(text).strip()


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, plain text) of each article in the built-in Wikipedia dump, in file order.
    Redirects and articles under 500 characters after cleaning are dropped.

    Parsing and cleaning the dump takes about 5 s, so the result is kept in the llmzip
    cache (paths.cache_dir) under a key that covers the dump's bytes and this module's
    source: an edit to the cleaning rules starts a new file."""
    source = _gensim_file(WIKI_FILE)
    key = hashlib.sha256(source.read_bytes() + Path(__file__).read_bytes()).hexdigest()[:16]
    cached = cache_dir() / "data" / f"wiki-articles-{key}.json"
    if cached.is_file():
        try:
            return tuple((t, body) for t, body in json.loads(cached.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            log.warning("ignoring unreadable cache file %s", cached)
    articles = _parse_wiki(source)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(articles), encoding="utf-8")
        os.replace(tmp, cached)
    except OSError as e:  # a read-only cache only costs the parse next time
        log.debug("could not cache the parsed wiki text in %s: %s", cached, e)
    return articles


def _parse_wiki(path: Path) -> tuple[tuple[str, str], ...]:
    articles = []
    with bz2.open(path) as fh:
        title = None
        for _, elem in ET.iterparse(fh):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "text":
                raw = elem.text or ""
                if not raw.lstrip().lower().startswith("#redirect"):
                    body = clean_wikitext(raw)
                    if len(body) >= 500:
                        articles.append((title, body))
            elif tag == "page":
                elem.clear()
    return tuple(articles)


def builtin_text(name: str) -> str:
    if name == "wiki":
        return "\n\n".join(f"{t}\n\n{body}" for t, body in wiki_articles())
    if name == "lee":
        return read_text(_gensim_file(LEE_FILE))
    raise DataError(f"unknown built-in corpus '{name}': choose one of {', '.join(BUILTIN)}")


def load_text(source: str) -> str:
    """Whole text of a source: built-in name, text file, or `hub:ID[:CONFIG]:SPLIT:COLUMN`."""
    if source in BUILTIN:
        return builtin_text(source)
    if source.startswith("hub:"):
        return _dataset_text(source[4:])
    path, column = Path(source).expanduser(), "text"
    if not path.is_file() and ":" in source:  # records file with a column: data.jsonl:content
        head, column = source.rsplit(":", 1)
        path = Path(head).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".parquet"):
        return _records_text(path, column)
    if path.is_file():
        return read_text(path)
    raise DataError(
        f"text source '{source}' not found: give a text, .jsonl or .parquet file, a built-in corpus "
        f"({', '.join(BUILTIN)}) or hub:ID[:CONFIG]:SPLIT:COLUMN"
    )


def _records(path: Path, column: str) -> list:
    """The `column` of every record of a .jsonl or .parquet file."""
    if path.suffix == ".jsonl":
        rows = [_json_line(path, i, line) for i, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError("reading parquet needs pyarrow: pip install 'llmzip[data]'") from e
        rows = pq.read_table(path).to_pylist()
    if rows and column not in rows[0]:
        raise DataError(f"column '{column}' not in {path}: it has {', '.join(rows[0])}; use {path}:COLUMN")
    return [r[column] for r in rows if r.get(column)]


def _json_line(path: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {number} is not JSON ({e.msg}): one JSON object per line") from None


def _as_text(values: list, source: str) -> str:
    if values and not isinstance(values[0], str):
        raise DataError(f"'{source}' holds {type(values[0]).__name__} values, not text: for conversations "
                        "(lists of {role, content}) calibrate with --chat")
    return "\n\n".join(values)


def _records_text(path: Path, column: str) -> str:
    """The `column` of every record of a .jsonl or .parquet file, joined by blank lines."""
    return _as_text(_records(path, column), str(path))


def _dataset_values(spec: str) -> list:
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise DataError(f"dataset spec 'hub:{spec}' must be hub:ID[:CONFIG]:SPLIT:COLUMN")
    try:
        import datasets
    except ImportError as e:
        raise DataError("datasets is not installed: pip install 'llmzip[data]'") from e
    name, config = parts[0], (parts[1] if len(parts) == 4 else None)
    split, column = parts[-2], parts[-1]
    ds = datasets.load_dataset(name, config, split=split)
    if column not in ds.column_names:
        raise DataError(f"column '{column}' not in {name}: it has {', '.join(ds.column_names)}")
    return [t for t in ds[column] if t]


def _dataset_text(spec: str) -> str:
    return _as_text(_dataset_values(spec), f"hub:{spec}")


def _is_conversation(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def load_conversations(source: str) -> list[list[dict]]:
    """Conversations (lists of {"role", "content"}) for chat-template calibration.

    A .jsonl/.parquet/hub column whose values are conversations (e.g. `data.jsonl:messages`)
    gives them as they are. Any text source (built-in corpus, text file, text column)
    gives conversations made of its consecutive non-empty lines (paragraphs): line 2k
    is the user turn and line 2k+1 the assistant's reply."""
    values = None
    if source.startswith("hub:"):
        values = _dataset_values(source[4:])
    elif source not in BUILTIN:
        path = Path(source).expanduser()
        if not path.is_file() and ":" in source:
            head, column = source.rsplit(":", 1)
            if Path(head).expanduser().suffix in (".jsonl", ".parquet"):
                values = _records(Path(head).expanduser(), column)
        elif path.is_file() and path.suffix in (".jsonl", ".parquet"):
            values = _records(path, "text")
    if values and _is_conversation(values[0]):
        bad = next((i for i, v in enumerate(values) if not _is_conversation(v)), None)
        if bad is not None:
            raise DataError(f"'{source}' record {bad} is not a list of {{role, content}} messages")
        return values
    text = _as_text(values, source) if values is not None else load_text(source)
    paras = [p.strip() for p in text.splitlines() if p.strip()]
    if len(paras) < 2:
        raise DataError(f"'{source}' has fewer than two paragraphs: cannot build conversations from it")
    return [[{"role": "user", "content": paras[i]}, {"role": "assistant", "content": paras[i + 1]}]
            for i in range(0, len(paras) - 1, 2)]
