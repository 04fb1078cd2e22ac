"""Evaluation: perplexity (and, later, KL divergence, tasks and regression reports)."""
