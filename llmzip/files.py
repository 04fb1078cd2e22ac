"""Reading user files (JSON configs, text, safetensors) with errors that name the file.

Every reader raises `FileFormatError` with the file's path, what is wrong and how to fix
it, instead of the library's bare JSONDecodeError / UnicodeDecodeError / SafetensorError.
Safetensors files are only ever opened through `open_safetensors`, whose header check
(safetensors verifies that the header's offsets cover the file exactly) catches a
truncated, random or bad-header file before any tensor is read.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from .errors import FileFormatError

REDO = "restore it, or re-create / re-download the model"


def read_json(path: str | Path) -> dict:
    """The JSON object stored in `path` (FileFormatError if empty, not JSON or not an object)."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise FileFormatError(f"{path} is empty: {REDO}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                              f"{REDO}") from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"{path} holds a JSON {type(obj).__name__}, not an object: {REDO}")
    return obj


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path` (FileFormatError naming the first bad byte otherwise)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                              "convert it to UTF-8, e.g. with iconv") from None


@contextmanager
def open_safetensors(path: str | Path):
    """`safetensors.safe_open(path, framework="pt")`, with a corrupt file reported by name."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise FileFormatError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                              f"{REDO}") from None
    with handle as fh:
        yield fh


def check_safetensors(directory: str | Path) -> None:
    """Open the header of every *.safetensors file in `directory` (cheap: no tensor is read),
    and check that every shard the index (model.safetensors.index.json) lists is there."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileFormatError(f"{directory / missing[0]} is missing ({len(missing)} of the {len(shards)} shards "
                                  f"that {index.name} lists): {REDO}")
    for f in sorted(directory.glob("*.safetensors")):
        with open_safetensors(f):
            pass
