"""Serving compressed models over HTTP (OpenAI-compatible): `llmzip serve`."""
