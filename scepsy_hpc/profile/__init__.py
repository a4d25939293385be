"""Profiling: per-LLM latency-vs-load curves (ProfileTable), the saturation sweep, synthetic
profiles from the performance model, and replay against a live endpoint."""
