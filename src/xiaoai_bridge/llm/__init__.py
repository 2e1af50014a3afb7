"""Chat backends: the seam between the pipeline and an LLM provider."""
