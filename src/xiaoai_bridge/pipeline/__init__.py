"""Turning an utterance into spoken chunks: trigger, memory, LLM, chunking, cleanup."""
