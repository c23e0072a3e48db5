"""The evaluation stage: quality against the source, KV cache, decode speed, lm-eval tasks."""
