"""Serving compressed models over HTTP (OpenAI-compatible): `llmzip serve`."""

if __name__ != "llmzip.serve":  # imported as a bare `serve`: see llmzip/layout.py
    from llmzip.layout import hand_over

    hand_over(__name__, __file__)
