"""scepsy_hpc: serve multi-LLM agentic workflows on Slurm GPU clusters."""

__version__ = "0.1.0"
