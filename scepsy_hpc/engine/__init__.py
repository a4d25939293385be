"""Inference engine adapters and the simulated OpenAI-compatible engine server (vllm/sglang adapters come later)."""
