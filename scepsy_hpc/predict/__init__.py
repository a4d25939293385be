"""The Aggregate LLM Pipeline predictors: workflow latency and throughput for an allocation."""
