"""Allocation: candidate configurations per LLM, the MILP that picks one each, and baselines."""
