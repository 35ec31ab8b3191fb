"""Benchmarks of the inference service (see docs/inference.md)."""
