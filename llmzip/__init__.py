"""llmzip: post-training quantization, evaluation and serving for Hugging Face causal LMs.

    import llmzip
    model, report = llmzip.quantize("smollm2-135m", llmzip.QuantConfig(), output_dir="out")
    model = llmzip.load("out")
"""

__version__ = "0.1.0"

from .config import ClipSearch, ConfigError, QuantConfig, WeightScheme  # noqa: E402


def __getattr__(name):
    # Heavy imports (transformers) only when these are first used.
    if name == "quantize":
        from .api import quantize

        return quantize
    if name == "load":
        from .checkpoint import load

        return load
    if name in ("QuantizedKVCache", "KVCacheConfig"):
        from . import kv_cache

        return getattr(kv_cache, name)
    raise AttributeError(name)


__all__ = ["ClipSearch", "ConfigError", "KVCacheConfig", "QuantConfig", "QuantizedKVCache", "WeightScheme", "load",
           "quantize"]
