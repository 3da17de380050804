"""Serving over HTTP, above infer/: the OpenAI-compatible API (openai_api.py, on the continuous
batcher of minimind.infer.batcher) and the web UI (web.py)."""
