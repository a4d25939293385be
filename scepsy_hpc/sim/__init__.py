"""Discrete-event simulator of multi-LLM agentic workflows on continuous-batching engines."""

from scepsy_hpc.sim.core import SimResult, LLMStats, simulate

__all__ = ["SimResult", "LLMStats", "simulate"]
