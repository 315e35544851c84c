"""Serving: an OpenAI-compatible HTTP server with Prometheus metrics over one AsyncLLM loop."""
