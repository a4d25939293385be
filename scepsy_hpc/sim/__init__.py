"""Discrete-event simulator of multi-LLM agentic workflows on continuous-batching engines."""

from scepsy_hpc.sim.core import SimResult, LLMStats, simulate
from scepsy_hpc.sim.workload import Call, sample_request

__all__ = ["SimResult", "LLMStats", "simulate", "Call", "sample_request"]
