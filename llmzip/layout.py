"""The checkout's top-level folders are parts of llmzip, never top-level packages.

`kernels/`, `serve/` and `eval/` sit at the checkout root and are installed as
`llmzip.kernels`, `llmzip.serve` and `llmzip.eval` (pyproject's package-dir). Whenever
the checkout root is on `sys.path` (`python -m pytest` or `python -c` run there), a plain
`import kernels` would find the folder before the installed package of that name; Hugging
Face's `kernels`, which transformers imports at start-up, is one. Each folder's
`__init__.py` therefore calls `hand_over` when it is imported under its bare name: the
import then yields the installed package of that name, or fails as if the folder were
not there. Stdlib only: this runs while transformers is half imported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or ".").resolve()
    except (OSError, RuntimeError):
        return None


def hand_over(name: str, init_file: str) -> None:
    """Replace the module `name` (this checkout's folder, imported as a top-level package)
    in `sys.modules` with the package of that name found on `sys.path` without the
    checkout root. Python's import returns whatever `sys.modules[name]` holds once the
    folder's `__init__` has run, so `import name` then gives the installed package."""
    root = Path(init_file).resolve().parent.parent
    search = [p for p in sys.path if _resolved(p) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        del sys.modules[name]
        raise ModuleNotFoundError(
            f"No module named {name!r} (this checkout's {name}/ folder is imported as llmzip.{name})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
