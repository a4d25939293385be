"""Call records, trace files (JSONL) and their aggregation into per-LLM workflow statistics."""
