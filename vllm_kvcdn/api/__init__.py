"""The publishing side API (FastAPI routes on vLLM's OpenAI-compatible server)."""
