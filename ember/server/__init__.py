"""The OpenAI-compatible HTTP server (FastAPI) over the AsyncEngine."""
