"""Serving compressed models over HTTP (OpenAI-compatible); see the project issues."""
