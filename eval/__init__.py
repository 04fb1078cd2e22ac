"""Evaluation: perplexity (and, later, KL divergence, tasks and regression reports)."""

if __name__ != "llmzip.eval":  # imported as a bare `eval`: see llmzip/layout.py
    from llmzip.layout import hand_over

    hand_over(__name__, __file__)
