"""What a workflow asks of the LLMs: sampled requests (calls, tool waits, parallel groups) and arrivals."""
