"""The checkout's folders never shadow an installed package (README, "Layout").

`kernels/`, `serve/` and `eval/` are llmzip.kernels, llmzip.serve and llmzip.eval; the
scripts in bench/ and the modules in tests/ run with their own folder on sys.path.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN_FOLDERS = ("kernels", "serve", "eval")

# Run from the checkout root, where `python -c` puts that root first on sys.path.
FROM_ROOT = r"""
import importlib.util, json, sys
from transformers import LlamaConfig   # imports Hugging Face's `kernels` on transformers >= 5.25
import llmzip.kernels, llmzip.serve, llmzip.eval
out = {"root_on_path": sys.path[0] in ("", "."),
       "llmzip.kernels": llmzip.kernels.__file__, "llmzip.serve": llmzip.serve.__file__,
       "llmzip.eval": llmzip.eval.__file__, "LlamaConfig": LlamaConfig.__name__}
for name in ("kernels", "serve", "eval"):
    try:
        out[name] = __import__(name).__file__
    except ModuleNotFoundError as e:
        out[name] = "missing: " + str(e)
print(json.dumps(out))
"""


def test_bare_names_from_the_checkout_root_give_installed_packages():
    res = subprocess.run([sys.executable, "-c", FROM_ROOT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["root_on_path"] is True
    assert out["LlamaConfig"] == "LlamaConfig"
    for name in OWN_FOLDERS:
        assert Path(out["llmzip." + name]) == ROOT / name / "__init__.py"
        installed = importlib.util.find_spec(name) if name not in sys.modules else sys.modules[name].__spec__
        if out[name].startswith("missing: "):
            assert f"this checkout's {name}/ folder" in out[name]
        else:
            # Whatever a bare import finds, it is never the checkout's folder.
            assert Path(out[name]).resolve().parent != ROOT / name, f"`import {name}` found the checkout's folder"
            assert installed is not None


def test_hugging_face_kernels_is_what_a_bare_import_gives_where_installed():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    code = "import kernels, sys; print(kernels.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "site-packages" in res.stdout and str(ROOT / "kernels") not in res.stdout


def test_no_script_or_test_module_is_named_like_an_installed_package():
    """bench/x.py runs with bench/ first on sys.path and pytest puts tests/ there: a
    module named like an installed top-level package (bench/kernels.py did) shadows it."""
    installed = set(importlib.metadata.packages_distributions())
    clashes = sorted(f"{d}/{p.name}" for d in ("bench", "tests") for p in (ROOT / d).glob("*.py")
                     if p.stem in installed)
    assert clashes == []
