"""The inference service: one API over the local model, vLLM and hosted providers."""
